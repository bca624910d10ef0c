"""A real OpenAI-compatible llama.cpp server (xllamacpp) on 127.0.0.1, for the end-to-end tests.

    python tests/llama_server.py MODEL.gguf PORT [N_CTX]
Runs until killed. OMP_WAIT_POLICY=PASSIVE should be set: busy-waiting threads stall requests on 2 cores."""
import sys
import time

import xllamacpp


def main() -> None:
    params = xllamacpp.CommonParams()
    params.model.path = sys.argv[1]
    params.hostnames = ["127.0.0.1"]
    params.port = int(sys.argv[2])
    params.n_ctx = int(sys.argv[3]) if len(sys.argv) > 3 else 8192
    params.n_parallel = 1
    # a 135M model's tokens come faster from one thread than from two (37 vs 20 tokens/s here, alone or beside a
    # busy core: two threads spend each token syncing); the prompt is read with both
    params.cpuparams.n_threads = 1
    params.cpuparams_batch.n_threads = 2
    server = xllamacpp.Server(params)
    print(f"listening on {server.listening_address}", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
