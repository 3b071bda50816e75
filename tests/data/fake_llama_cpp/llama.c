int fake_ggml(void);
int fake_gate(void);
int fake_llama(void) { return fake_ggml() + 1 + fake_gate(); }
