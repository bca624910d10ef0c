"""Ternary (1.58-bit) quantization-aware training of a small LLM, within a fixed time budget.

The research agent edits this file, one focused change per experiment. It ends with
`prepare.submit(...)`; the score is computed afterwards by prepare.py on the submitted ternary
weights, so nothing printed here is trusted. `python train.py` alone is a manual baseline run.
"""
import copy
import math
import os
import resource
import time

T_PROCESS = time.time()  # before the heavy imports: start-up is reported by phase

import torch
import torch.nn as nn
import torch.nn.functional as F

import prepare

# ---------------------------------------------------------------- quantization strength λ
# λ blends full precision (0) into ternary (1): w + λ·(q(w) − w).detach(). Evaluation is at λ=1.
LAMBDA_SCHEDULE = "linear"      # linear | cosine | exponential | two_phase | constant
LAMBDA_WARMUP_STEPS = 50        # steps from λ=0 to λ=1 (a 135M model barely needs warmup)
LAMBDA_WARMUP_FRAC = None       # if set (0..1): warmup over this fraction of the time budget instead
TWO_PHASE_SPLIT = 0.3           # two_phase: share of the warmup spent in the fast phase ...
TWO_PHASE_LEVEL = 0.8           # ... which brings λ to this level; the slow phase brings it to 1
EXP_SHARPNESS = 5.0             # exponential: λ = (1 − e^(−k·t)) / (1 − e^(−k))

# ---------------------------------------------------------------- ternary quantizer
GROUP_SIZE = "row"              # 32 | 64 | 128 | 256 | "row" (per output row) | "tensor"; nothing else scores
SCALE_RULE = "mean"             # mean: s = mean|w| (BitNet b1.58) | absmax: s = max|w|
THRESHOLD = 0.5                 # |w|/s below this → 0; 0.5 is round(clamp(w/s, −1, 1))

# ---------------------------------------------------------------- deadzone recovery (weights stuck at 0)
DEADZONE = "none"               # none | tequila | bias | gradscale
TEQUILA_INIT = 1e-3             # tequila: initial learnable λ per row, bias = λ·Σ dead weights
BIAS_EMA = 0.99                 # bias: EMA of the input mean for the injected bias Σ dead w·E[x]
DEADZONE_GRAD_SCALE = 2.0       # gradscale: gradient multiplier for weights quantized to 0

# ---------------------------------------------------------------- losses
CE_WEIGHT = 1.0                 # next-token cross-entropy on the training text
KD_WEIGHT = 1.0                 # logits distillation from the frozen full-precision teacher
KD_TEMPERATURE = 1.0
FEATURE_WEIGHT = 0.0            # OFF loss: 1 − cos(student, teacher) of the final hidden states

# ---------------------------------------------------------------- optimization
LR = 3e-4
LR_SCHEDULE = "cosine"          # constant | linear | cosine (decay over the time budget)
LR_WARMUP_STEPS = 10
MIN_LR_FRAC = 0.1               # final LR as a fraction of LR for linear/cosine decay
WEIGHT_DECAY = 0.0              # decay pulls weights into the deadzone
BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0
BATCH_SIZE = 8
SEQ_LEN = 512
COMPILE = False                 # torch.compile the model (GPU only; compile time counts in the budget)
SEED = 0

# ---------------------------------------------------------------- time
EXPORT_RESERVE_S = 15.0         # stop training this long before the deadline, to export
MAX_STEPS = None                # stop after this many steps (None: train until the deadline): a quick check
LOG_EVERY_S = 10.0


# ---------------------------------------------------------------- schedules
def lambda_at(step: int, progress: float) -> float:
    """Quantization strength for this step; progress is the elapsed share of the time budget."""
    if LAMBDA_SCHEDULE == "constant":
        return 1.0
    t = progress / LAMBDA_WARMUP_FRAC if LAMBDA_WARMUP_FRAC else step / max(LAMBDA_WARMUP_STEPS, 1)
    t = min(max(t, 0.0), 1.0)
    if LAMBDA_SCHEDULE == "linear":
        return t
    if LAMBDA_SCHEDULE == "cosine":
        return 0.5 * (1 - math.cos(math.pi * t))
    if LAMBDA_SCHEDULE == "exponential":
        return (1 - math.exp(-EXP_SHARPNESS * t)) / (1 - math.exp(-EXP_SHARPNESS))
    if LAMBDA_SCHEDULE == "two_phase":
        if t < TWO_PHASE_SPLIT:
            return TWO_PHASE_LEVEL * t / TWO_PHASE_SPLIT
        return TWO_PHASE_LEVEL + (1 - TWO_PHASE_LEVEL) * (t - TWO_PHASE_SPLIT) / (1 - TWO_PHASE_SPLIT)
    raise ValueError(f"unknown LAMBDA_SCHEDULE {LAMBDA_SCHEDULE!r}")


def lr_at(step: int, progress: float) -> float:
    warm = min(1.0, (step + 1) / max(LR_WARMUP_STEPS, 1))
    p = min(max(progress, 0.0), 1.0)
    if LR_SCHEDULE == "constant":
        decay = 1.0
    elif LR_SCHEDULE == "linear":
        decay = 1 - (1 - MIN_LR_FRAC) * p
    elif LR_SCHEDULE == "cosine":
        decay = MIN_LR_FRAC + (1 - MIN_LR_FRAC) * 0.5 * (1 + math.cos(math.pi * p))
    else:
        raise ValueError(f"unknown LR_SCHEDULE {LR_SCHEDULE!r}")
    return LR * warm * decay


# ---------------------------------------------------------------- the ternary layer
def n_groups(weight: torch.Tensor) -> int:
    """Groups over the row-major flattened weight (576-wide rows need not divide the group size)."""
    if GROUP_SIZE == "tensor":
        return 1
    if GROUP_SIZE == "row":
        return weight.shape[0]
    if type(GROUP_SIZE) is not int or GROUP_SIZE not in prepare.GROUP_SIZES:
        raise ValueError(f"GROUP_SIZE {GROUP_SIZE!r} is off the evaluator's grid: {prepare.QUANT_GRID}")
    if weight.numel() % GROUP_SIZE:
        raise ValueError(f"GROUP_SIZE {GROUP_SIZE} does not divide a {list(weight.shape)} weight")
    return weight.numel() // GROUP_SIZE


def ternarize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes in {−1, 0, 1} (shaped like weight) and one scale per group."""
    grouped = weight.detach().reshape(n_groups(weight), -1)
    if SCALE_RULE == "mean":
        scales = grouped.abs().mean(dim=1)
    elif SCALE_RULE == "absmax":
        scales = grouped.abs().amax(dim=1)
    else:
        raise ValueError(f"unknown SCALE_RULE {SCALE_RULE!r}")
    scales = scales.clamp(min=1e-8)
    codes = torch.sign(grouped) * (grouped.abs() / scales[:, None] >= THRESHOLD)
    return codes.view_as(weight), scales


def dequant(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return (codes.reshape(scales.numel(), -1) * scales[:, None]).view_as(codes)


def scale_dead_grad(weight: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """Same values, gradient × DEADZONE_GRAD_SCALE where the code is 0 (helps weights escape)."""
    k = 1 + (DEADZONE_GRAD_SCALE - 1) * dead
    return weight * k - (weight * (k - 1)).detach()


class BitLinear(nn.Linear):
    """nn.Linear trained with a straight-through estimator towards ternary weights."""

    def __init__(self, linear: nn.Linear, strength: torch.Tensor):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         device=linear.weight.device, dtype=linear.weight.dtype)
        self.load_state_dict(linear.state_dict())
        self.strength = strength  # shared 0-d tensor λ: changing it needs no recompile, no sync
        if DEADZONE == "tequila":
            self.tequila = nn.Parameter(torch.full((self.out_features,), TEQUILA_INIT, device=self.weight.device))
        if DEADZONE == "bias":
            self.register_buffer("input_mean", torch.zeros(self.in_features, device=self.weight.device))

    def deadzone_bias(self, codes: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        """An input-independent bias standing in for the weights quantized to 0."""
        dead_w = weight * (codes == 0)
        if DEADZONE == "tequila":
            return self.tequila * dead_w.sum(dim=1)
        if DEADZONE == "bias":
            return dead_w @ self.input_mean
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, scales = ternarize(self.weight)
        weight = self.weight
        if DEADZONE == "gradscale":
            weight = scale_dead_grad(weight, (codes == 0).to(weight.dtype))
        if DEADZONE == "bias" and self.training:
            with torch.no_grad():
                self.input_mean.lerp_(x.detach().reshape(-1, x.shape[-1]).mean(0).float(), 1 - BIAS_EMA)
        lam = self.strength.to(weight.dtype)
        w_eff = weight + lam * (dequant(codes, scales).to(weight.dtype) - weight).detach()
        bias = self.bias
        extra = self.deadzone_bias(codes, weight)
        if extra is not None:
            bias = lam * extra.to(weight.dtype) if bias is None else bias + lam * extra.to(weight.dtype)
        return F.linear(x, w_eff, bias)

    def export_ternary(self) -> dict:
        """What prepare.submit stores; equals this layer's forward at λ=1."""
        with torch.no_grad():
            codes, scales = ternarize(self.weight.float())
            extra = self.deadzone_bias(codes, self.weight.float())
        return {"codes": codes.to(torch.int8), "scales": scales.float(),
                "bias": None if extra is None else extra.float()}


def quantize_model(model: nn.Module, strength: torch.Tensor) -> nn.Module:
    """Replace every decoder linear (everything prepare.submit requires) by a BitLinear."""
    for name in prepare.targeted_linears(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, BitLinear(getattr(parent, child), strength))
    return model


# ---------------------------------------------------------------- losses
def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    t = KD_TEMPERATURE
    student = F.log_softmax(student_logits.float().flatten(0, 1) / t, -1)
    teacher = F.log_softmax(teacher_logits.float().flatten(0, 1) / t, -1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * t * t


def feature_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    return (1 - F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)).mean()


def training_loss(model: nn.Module, teacher: nn.Module | None, batch: torch.Tensor) -> torch.Tensor:
    inputs, targets = batch[:, :-1], batch[:, 1:]
    need_hidden = FEATURE_WEIGHT > 0
    out = model(input_ids=inputs, output_hidden_states=need_hidden)
    loss = CE_WEIGHT * F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten())
    if teacher is not None:
        with torch.no_grad():
            ref = teacher(input_ids=inputs, output_hidden_states=need_hidden)
        if KD_WEIGHT:
            loss = loss + KD_WEIGHT * distill_loss(out.logits, ref.logits)
        if need_hidden:
            loss = loss + FEATURE_WEIGHT * feature_loss(out.hidden_states[-1], ref.hidden_states[-1])
    return loss


# ---------------------------------------------------------------- data
def random_batch(tokens: torch.Tensor, gen: torch.Generator, dev: torch.device) -> torch.Tensor:
    starts = torch.randint(0, tokens.numel() - SEQ_LEN - 1, (BATCH_SIZE,), generator=gen)
    batch = torch.stack([tokens[s: s + SEQ_LEN + 1] for s in starts.tolist()])
    return batch.to(dev, non_blocking=True)


def peak_memory_gb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


# ---------------------------------------------------------------- main
def main() -> None:
    t0 = time.time()
    torch.manual_seed(SEED)
    dev = prepare.device()
    tokens = prepare.load_train_tokens()
    t_data = time.time()
    model = prepare.load_model().to(dev)
    t_model = time.time()
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if KD_WEIGHT or FEATURE_WEIGHT else None
    strength = torch.zeros((), device=dev)
    quantize_model(model, strength).train()
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LR, betas=BETAS, fused=dev.type == "cuda")
    step_fn = torch.compile(model) if COMPILE and dev.type == "cuda" else model
    gen = torch.Generator().manual_seed(SEED)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")

    train_start = time.time()
    stop_at = prepare.deadline() - EXPORT_RESERVE_S
    budget = max(stop_at - train_start, 1e-6)
    print(f"start-up {train_start - T_PROCESS:.1f} s on {dev.type}: imports {t0 - T_PROCESS:.1f}, data {t_data - t0:.1f}, "
          f"model {t_model - t_data:.1f}, teacher+quantize+optimizer {train_start - t_model:.1f}; "
          f"training for {budget:.0f} s", flush=True)
    step, last_log, step_s, loss = 0, train_start, 0.0, torch.zeros(())
    while (MAX_STEPS is None or step < MAX_STEPS) and time.time() + 1.5 * step_s < stop_at:
        t_step = time.time()
        progress = (t_step - train_start) / budget
        lam, lr = lambda_at(step, progress), lr_at(step, progress)
        strength.fill_(lam)
        for group in opt.param_groups:
            group["lr"] = lr
        with amp:
            loss = training_loss(step_fn, teacher, random_batch(tokens, gen, dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if GRAD_CLIP:
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        step += 1
        now = time.time()
        if step == 1:
            print(f"first step done {now - T_PROCESS:.1f} s after start", flush=True)
        step_s = now - t_step  # the next step must fit before stop_at (a slow first step is the safe estimate)
        if now - last_log >= LOG_EVERY_S:
            tok_s = step * BATCH_SIZE * SEQ_LEN / (now - train_start)
            print(f"step {step:5d}  loss {loss.item():.4f}  λ {lam:.3f}  lr {lr:.2e}  {tok_s:,.0f} tok/s  "
                  f"{now - train_start:.0f}s elapsed, {stop_at - now:.0f}s left", flush=True)
            last_log = now

    strength.fill_(1.0)
    train_seconds = time.time() - train_start
    report = {"steps": step, "tokens": step * BATCH_SIZE * SEQ_LEN, "train_seconds": round(train_seconds, 1),
              "peak_mem_gb": round(peak_memory_gb(dev), 3), "final_loss": round(loss.item(), 4) if step else None}
    path = prepare.submit(model, report)
    print(f"submitted {path} after {step} steps", flush=True)
    mode = os.environ.get("AR_EVAL", "")
    if mode == "external":  # the driver scores the submission in a fresh process
        return
    result = prepare.evaluate(path, max_windows=int(mode) if mode.isdigit() else None)
    prepare.record_manual_run(result, report)
    print("---")
    print(f"val_ppl:        {result['ppl']:.4f}  (protocol {prepare.protocol_label(result)})")
    print(f"train_seconds:  {report['train_seconds']}")
    print(f"steps:          {step}")
    print(f"tokens:         {report['tokens']}")
    print(f"peak_mem_gb:    {report['peak_mem_gb']}")


if __name__ == "__main__":
    main()
