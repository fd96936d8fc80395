"""The torch-free light path (issue 20 item 2): ``inspect`` and ``convert`` of PEFT, GGUF, MLX
and our own safetensors adapters read their tensors as numpy (``arrays.Stored``) through the
formats' own readers and writers, so the command never imports torch (``import torch`` alone is
2.4 s here). route.py decides which path a command takes.

Anything the light path cannot do raises ``arrays.NeedsTorch`` inside it and the command takes
today's torch path instead, silently: the answer (report, written bytes, error) is the same.
"""
