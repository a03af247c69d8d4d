"""The training program (``deepspeed train/run.py``) and its helpers."""
