"""Two chest X-ray files in, an answer out: processor -> LapvqaVisionModel -> LapvqaDiffVQAModel."""

import numpy as np
import torch
from lapvqa_hf.convert.checkpoint import StateDictMapper
from lapvqa_hf.convert.common import expected_shapes
from lapvqa_hf.convert.diffvqa import convert_state_dict, infer_config
from lapvqa_hf.convert.original import DiffVQAHead, VisionTransformer, randomize_
from lapvqa_hf.convert.vision_encoder import infer_vision_config, map_vision_encoder
from PIL import Image
from test_image_processing import write_dicom

from lapvqa_hf import LapvqaDiffVQAModel, LapvqaImageProcessor, LapvqaProcessor, LapvqaVisionModel


def test_prior_png_and_current_dicom_to_an_answer(tmp_path, gpt2_tokenizer):
    # Upstream-layout encoder (width 768, so it can feed a head trained for the "coca" width) and head.
    original_encoder = randomize_(
        VisionTransformer(img_size=56, patch_size=14, embed_dim=768, depth=2, num_heads=4), seed=4
    ).eval()
    original_head = randomize_(
        DiffVQAHead(vis_dim=768, d_model=64, nhead=4, num_layers=2, dim_feedforward=96), seed=5, std=0.1
    ).eval()

    vision_config = infer_vision_config(original_encoder.state_dict(), num_attention_heads=4)
    encoder = LapvqaVisionModel(vision_config)
    mapper = StateDictMapper(original_encoder.state_dict())
    map_vision_encoder(mapper, vision_config, source="", target="")
    encoder.load_state_dict(mapper.finish(expected_shapes(encoder)))
    head_config = infer_config(original_head.state_dict(), "coca", num_attention_heads=4)
    head = LapvqaDiffVQAModel(head_config)
    head.load_state_dict(convert_state_dict(original_head.state_dict(), head_config))
    encoder.eval(), head.eval()

    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((64, 60)) * 65535).astype(np.uint16)).save(tmp_path / "prior.png")
    write_dicom(tmp_path / "current.dcm", rng.integers(0, 4096, (60, 64)), "MONOCHROME1", window=(2048, 4096))
    processor = LapvqaProcessor(LapvqaImageProcessor.for_encoder(vision_config), gpt2_tokenizer)
    questions = ["what has changed compared to the reference image?", "is the effusion bigger?"]
    inputs = processor(
        prior_images=[tmp_path / "prior.png"] * 2, current_images=[tmp_path / "current.dcm"] * 2, text=questions
    )

    with torch.no_grad():
        ref_vis = encoder(inputs["prior_pixel_values"]).last_hidden_state
        curr_vis = encoder(inputs["current_pixel_values"]).last_hidden_state
    generated = head.generate(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        current_image_features=curr_vis,
        prior_image_features=ref_vis,
        max_new_tokens=8,
        do_sample=False,
    )
    answers = processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(answers) == 2 and all(isinstance(a, str) and a for a in answers)

    # The same images through the original encoder and the original head's greedy loop.
    with torch.no_grad():
        original_ref = original_encoder(inputs["prior_pixel_values"])
        original_curr = original_encoder(inputs["current_pixel_values"])
    for i, question in enumerate(questions):
        question_ids = torch.tensor([gpt2_tokenizer(question, add_special_tokens=False)["input_ids"]])
        expected = original_head.generate(
            original_curr[i : i + 1], original_ref[i : i + 1], question_ids, 50256, 50256, 8
        )
        assert processor.decode(expected[0]) == answers[i]
