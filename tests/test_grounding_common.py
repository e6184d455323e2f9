"""Transformers' own `ModelTesterMixin` and `ConfigTester` against `LapvqaGroundingModel` (as
tests/test_transformers_common.py runs them against the other LAPVQA classes)."""

import unittest

import torch
from transformers_common_tests import import_common

from lapvqa_hf import LapvqaGroundingConfig, LapvqaGroundingModel

common = import_common("test_modeling_common")
ModelTesterMixin, floats_tensor = common.ModelTesterMixin, common.floats_tensor
ConfigTester = import_common("test_configuration_common").ConfigTester


class GroundingModelTester:
    """A tiny TransVG-style head: 2 encoder layers over [REG], 9 visual tokens and the phrase token, with positions."""

    def __init__(
        self,
        parent,
        batch_size=13,
        vis_dim=24,
        txt_dim=20,
        num_visual_tokens=9,
        d_model=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        is_training=True,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.vis_dim = vis_dim
        self.txt_dim = txt_dim
        self.num_visual_tokens = num_visual_tokens
        self.d_model = self.hidden_size = d_model
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.is_training = is_training
        self.seq_length = num_visual_tokens + 2  # [REG] + visual tokens + the phrase

    def get_config(self):
        return LapvqaGroundingConfig(
            vis_dim=self.vis_dim,
            txt_dim=self.txt_dim,
            d_model=self.d_model,
            encoder_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            encoder_ffn_dim=37,
            max_position_embeddings=self.seq_length + 3,
        )

    def prepare_config_and_inputs_for_common(self):
        image_features = floats_tensor([self.batch_size, self.num_visual_tokens, self.vis_dim])
        text_features = floats_tensor([self.batch_size, self.txt_dim])
        return self.get_config(), {"image_features": image_features, "text_features": text_features}


class LapvqaGroundingModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (LapvqaGroundingModel,)
    additional_model_inputs = ["text_features"]  # beside the main input, `image_features`
    test_resize_embeddings = False  # no token embeddings: it takes image and phrase features
    test_missing_keys = False  # as DETR

    def setUp(self):
        self.model_tester = GroundingModelTester(self)
        self.config_tester = ConfigTester(
            self, config_class=LapvqaGroundingConfig, has_text_modality=False, common_properties=["d_model"]
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels:  # one target box (cx, cy, w, h) per (image, phrase)
            box = torch.tensor([0.4, 0.6, 0.3, 0.2], device=common.torch_device)
            inputs_dict["labels"] = box.expand(self.model_tester.batch_size, -1).clone()
        return inputs_dict

    @unittest.skip(reason="as DETR: the head has no input embeddings (it takes image and phrase features)")
    def test_model_get_set_embeddings(self):
        pass
