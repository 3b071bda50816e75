int fake_ggml(void) { return 41; }
