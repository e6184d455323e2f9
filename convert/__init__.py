"""Converters from the raw upstream LAPVQA `.pt` files to Transformers model folders.

Installed as `lapvqa_hf.convert`; each converter is also a `python -m lapvqa_hf.convert.<model>` script and a
`lapvqa convert <model>` subcommand.
"""
