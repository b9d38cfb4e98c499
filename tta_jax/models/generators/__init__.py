"""Networks that write parameters: GeneralizeFormer's transformer."""
