"""HF remote code written into every saved DSMoE, LLaMA-MoE and LLM-Pruner directory.

``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` then gives the method's model in any
process (lm-eval's ``--model hf --model_args pretrained=DIR,trust_remote_code=True`` included), and without
``trust_remote_code`` transformers refuses instead of loading a dense model. The files of this package import
only torch and transformers (never dsmoe): :mod:`.partitioned_swiglu` (the partitioned SwiGLU and its gates,
which the library's layers subclass), :mod:`.pruned_shapes` (LLM-Pruner's per-layer shapes),
:mod:`.configuration_dsmoe` and :mod:`.modeling_dsmoe`. SparseGPT and dense models are saved as plain HF
models: a SparseGPT model is the dense architecture with zeros in its pruned weights, which plain
transformers opens correctly (its masks only matter for continued training).
"""

from pathlib import Path

REMOTE_FILES = ("configuration_dsmoe.py", "modeling_dsmoe.py", "partitioned_swiglu.py", "pruned_shapes.py")
REMOTE_DIR = Path(__file__).parent
