"""What the tests share, imported as ``helpers.<module>`` (tests/ is on sys.path: pytest puts the
rootdir of conftest.py there, tests/golden/cases.py does it for regenerate.py).

- ``cli``: ``run_cli`` (the one way a test runs the CLI), ``start_cli`` and ``foreground`` for
  signalled children, the failure-contract assertions;
- ``models``: tiny seeded models (transformers Llama / GPT-2, a conv net, the GGUF architectures);
- ``peft_adapters``: PEFT adapters made with the real PEFT on them, the PEFT feature cases;
- ``adapters``: adaptertools' own tiny adapters as PEFT folders, with bad values planted;
- ``checkpoints``: a sharded safetensors base, one stored tensor read or overwritten in place;
- ``validation``: the merges the validator is tried on, float64 deltas, failed tensor names;
- ``gguf_base``: tiny models written as GGUF models llama.cpp loads, llama.cpp's logits;
- ``hub_server``: a Hugging Face Hub-compatible server on 127.0.0.1.

Test modules import from here, never from conftest.py or from each other
(tests/test_test_layout.py checks it).
"""
