"""Synthetic phantoms: chest radiographs and breast tomosynthesis volumes with known
findings. `cadnode engines verify` runs every engine on them; `training/` trains on them."""
