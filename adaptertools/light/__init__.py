"""The torch-free light path (issue 20 item 2): ``inspect`` and ``convert`` of PEFT, GGUF and
MLX adapters read their tensors as numpy (``arrays.Stored``) through the formats' own readers,
so the command never imports torch (``import torch`` alone is 2.4 s here).

Anything the light path cannot do raises ``arrays.NeedsTorch`` inside it and the command takes
today's torch path instead, silently: the answer (report, written bytes, error) is the same.
"""
