"""Fine-tune a LAPVQA head on frozen features with accelerate: a DiffVQA head, the captioning decoder or a detector.

    accelerate launch -m lapvqa_hf.train --config train.json [--set key=value ...]
    accelerate launch --multi_gpu --num_processes 2 -m lapvqa_hf.train --config train.json

The config is a JSON object of `TrainConfig` fields; `--set` overrides any of them. `task` says what is trained:

- `diffvqa`: a DiffVQA head on MIMIC-Diff-VQA; `question + [bos] + answer + [eos]`, the loss covers the answer
  and its eos (question and bos are masked with -100).
- `captioning`: the report decoder of `LapvqaCaptioningModel` on MIMIC-CXR reports (`report_sections`);
  `[bos] + report + [eos]`, the loss covers the report and its eos. The frozen ViT-L/14 is not trained and not
  run: the features are its stored patch tokens. It is loaded (from `vision_encoder`, by default the checkpoint
  the features were extracted with) only to complete the saved model, so that it also reports from pixels.
- `detection`: a DETR-style detection head on VinDr-CXR boxes (`lapvqa_hf.detection_data`), the radiologists' boxes
  combined by `radiologists`; transformers' DETR set loss; validated by mAP at IoU 0.4 and 0.5 (`map40`, `map50`).
- `grounding`: a TransVG-style phrase-grounding head on MS-CXR boxes (`lapvqa_hf.grounding_data`), each phrase
  embedded once by the text tower of `text_recipe` / `text_checkpoint`; TransVG's L1 + GIoU loss; validated by
  mIoU, Acc@0.25, Acc@0.5 and pointing accuracy (`miou`, `acc25`, `acc50`, `pointing`).

All run the same loop; what differs (data, batches, model, validation predictions, scoring, saving) is a task
(`TrainingTask`). The package: `config` (the fields, each task's options, the one check), `tasks`, `checkpoints`
(saving safely, resuming), `loop` (`train`) and `command` (`main`).
AdamW (no weight decay on biases, LayerNorm weights and embeddings, as in transformers' Trainer) with linear warmup
then cosine decay, gradient accumulation, clipping, mixed precision and trackers (`log_with`) come from accelerate;
the main process shows a progress bar (loss, learning rate, tokens/s). `checkpoint_every` steps the whole training
state is saved (`accelerator.save_state`; `save_total_limit` keeps the newest) and a re-run resumes from the latest
checkpoint to the same result as an uninterrupted run. Every `eval_every` steps the validation split is predicted
(generated greedily, or detected), shared among the processes, and scored (BLEU/ROUGE/CIDEr, or mAP); the best model
(by `best_metric`) is saved with `save_pretrained`, with its tokenizer (DiffVQA), processor (captioning) or image
processor (detection), ready for `lapvqa push`.

Faults: the config is checked whole before any work (one `error:` line per problem); checkpoints and the best model
are written under partial names and renamed into place, so that a kill at any instant loses nothing complete; a
resumed run applies config changes (and says so) or refuses them; a NaN or infinite loss or gradient norm stops
training before the update, so that no saved weights have it; under a launcher, the trainer exits with it.
"""

from .command import exit_with_launcher, main
from .config import (
    CaptioningOptions,
    DetectionOptions,
    GroundingOptions,
    NonFiniteError,
    TrainConfig,
    TrainConfigError,
    config_fields_help,
    config_problems,
)
from .loop import evaluate_and_keep_best, parameter_groups, train
from .tasks import (
    CaptioningTask,
    DetectionExamples,
    DetectionTask,
    DiffVQAExamples,
    DiffVQATask,
    GroundingTask,
    ReportExamples,
    ReportGenerationTask,
    TrainingTask,
    answer_split,
    report_collate,
    report_split,
    task_for,
    task_for_model,
    training_collate,
)

__all__ = [
    "CaptioningOptions",
    "CaptioningTask",
    "DetectionExamples",
    "DetectionOptions",
    "GroundingOptions",
    "DetectionTask",
    "DiffVQAExamples",
    "DiffVQATask",
    "GroundingTask",
    "NonFiniteError",
    "ReportExamples",
    "ReportGenerationTask",
    "TrainConfig",
    "TrainConfigError",
    "TrainingTask",
    "answer_split",
    "config_fields_help",
    "config_problems",
    "evaluate_and_keep_best",
    "exit_with_launcher",
    "main",
    "parameter_groups",
    "report_collate",
    "report_split",
    "task_for",
    "task_for_model",
    "train",
    "training_collate",
]
