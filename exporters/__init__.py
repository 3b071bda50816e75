"""Export stage: merge, GGUF export and publishing to the Hugging Face Hub."""
