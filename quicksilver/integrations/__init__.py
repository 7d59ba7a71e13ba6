"""Other libraries seen from quicksilver: Hugging Face transformers as the reference our engine
is checked and timed against (``hf_reference``)."""
