"""What a LAPVQA model folder ships as remote code: the configurations, models, image processor, processor,
pipelines, X-ray readers and the frozen-encoder recipes. These files import only each other (relatively),
transformers, torch and their other libraries, so that a folder runs without `lapvqa_hf` installed."""
