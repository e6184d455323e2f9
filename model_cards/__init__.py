"""Hub model card templates of the converted LAPVQA repos (package data, rendered by `lapvqa_hf.model_card`)."""
