"""trainkit: what train_qlora.py, train_lora.py and distill.py share, one module per concern."""

import logging

# bitsandbytes' CPU backend looks for the optional `kernels` package (which fetches from a hub) and
# logs a warning on every import without it; the plain CPU kernels it falls back to are what we use.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
