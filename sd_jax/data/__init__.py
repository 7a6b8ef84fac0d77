"""Synthetic captioned shapes dataset (``shapes``), its CLIP-format tokenizer
files (``tokenizer``) and an evaluator that reads generated images back
(``evaluator``)."""
