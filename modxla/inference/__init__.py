"""Using a trained run: load its model, tokenizer and thresholds; sample text."""
