"""Print the `model:` recipe settings that match a Hugging Face model directory.

    python tools/hf_model_config.py /models/Qwen2.5-7B-Instruct > configs/models/qwen2.5-7b-instruct.yaml

Then start a run from its weights with ``train.init_checkpoint=/models/Qwen2.5-7B-Instruct``.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from mrl.model.hf import HFCheckpointError, model_fields_from_hf, read_hf_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="Hugging Face model directory (config.json + safetensors)")
    args = parser.parse_args(argv)
    try:
        config = read_hf_config(args.directory)
        fields = model_fields_from_hf(config)
    except HFCheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    fields["max_sequence_length"] = min(config.get("max_position_embeddings", 4096), 4096)
    print(f"# From {args.directory}/config.json ({config['model_type']}); max_sequence_length is the training")
    print("# length (at most the checkpoint's max_position_embeddings): set it to what you train on.")
    print(yaml.safe_dump({"model": fields}, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
