"""dfq: data-free quantization to deployable integer models."""
