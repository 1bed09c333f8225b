"""The names of the files and keys in every folder mpsupernet writes; every reader and writer takes them from here.

It imports nothing, so that the PyTorch-free runtime (`mpsupernet.runtime`) and the writers share one spelling.

A model folder (`save_pretrained`, a tier, `export_onnx`):

- `config.json` (`CONFIG_NAME`): the configuration. It records the sha256 of each weights file under
  `weights_sha256` (`WEIGHTS_DIGEST_KEY`) and, after an ONNX export, an `export` section (`EXPORT_KEY`) listing the
  export's files (`files`) with their digests (`sha256`, `EXPORT_DIGEST_KEY`);
- the weights (transformers' names: `model.safetensors`, its shards and index);
- `preprocessor_config.json` (`PREPROCESSOR_NAME`): the image processor at the model's input size;
- `vision_encoder.onnx` and `prompt_encoder_mask_decoder.onnx` (`VISION_ENCODER_NAME`, `PROMPT_DECODER_NAME`): the
  ONNX export; a semantic segmentation subnet's has `class_decoder.onnx` (`CLASS_DECODER_NAME`) in place of the
  prompt decoder;
- `README.md` (`CARD_NAME`): the model card.

A tiers folder (`save_tiers`, `push_tiers`): `tiers.json` (`MANIFEST_NAME`), the root card `README.md`, and one
model folder per tier, inside a generation folder `_v<n>` (`GENERATION_PREFIX`) when written over earlier tiers.

A training run's `output_dir` holds checkpoints `checkpoint-<step>` (`CHECKPOINT_PREFIX`), each completed by
`checkpoint_complete.json` (`CHECKPOINT_COMPLETE_NAME`) and holding the loop's `training_state.json`
(`TRAINING_STATE_NAME`).

A latency model's folder (`LatencyModel.save_pretrained`) holds `latency_model.json` (`LATENCY_MODEL_NAME`).

Names that only writers use: staging folders and files are `.<target>.mpsupernet-staging-<random>`
(`STAGING_MARKER`), and a writer holds `.<target>.mpsupernet-lock` (`LOCK_SUFFIX`) beside its target.
"""

CONFIG_NAME = "config.json"
PREPROCESSOR_NAME = "preprocessor_config.json"
CARD_NAME = "README.md"
VISION_ENCODER_NAME = "vision_encoder.onnx"
PROMPT_DECODER_NAME = "prompt_encoder_mask_decoder.onnx"
CLASS_DECODER_NAME = "class_decoder.onnx"
MANIFEST_NAME = "tiers.json"
GENERATION_PREFIX = "_v"
CHECKPOINT_PREFIX = "checkpoint"
CHECKPOINT_COMPLETE_NAME = "checkpoint_complete.json"
TRAINING_STATE_NAME = "training_state.json"
LATENCY_MODEL_NAME = "latency_model.json"

WEIGHTS_DIGEST_KEY = "weights_sha256"
EXPORT_KEY = "export"
EXPORT_FILES_KEY = "files"
EXPORT_DIGEST_KEY = "sha256"

STAGING_MARKER = ".mpsupernet-staging-"
LOCK_SUFFIX = ".mpsupernet-lock"
