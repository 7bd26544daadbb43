"""Layer 3, core: the clock cycle itself. Events and traces, the op registry, the engine, the architectures'
blocks, attention arithmetic and the KV cache, norms, RoPE, sampling. Imports only the layers below."""
