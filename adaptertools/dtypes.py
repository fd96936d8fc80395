"""Every dtype table of the package, in one place. Imports nothing from the package.

Name tables (plain strings) are defined at module level. Tables keyed by or holding torch dtypes
are built on first use (module ``__getattr__``), so importing this module, and so
``import adaptertools`` or ``adaptertools --help``, does not import torch.

Dtype names: *option names* are what users type (``fp32``, ``fp16``, ``bf16``); *stored names*
are the safetensors / GGML type names in headers and ``Job.out_dtype`` (``F32``, ``F16``, ``BF16``).
"""

from __future__ import annotations

# the stored float names a merge reads and writes as plain floats (anything else in a GGUF is a
# block-quantized type); merging/bases.py, plan.py, quantized.py, validation/merged.py,
# kernels/quant/gguf.py
FLOAT_DTYPES = ("F32", "F16", "BF16")

# safetensors dtype names -> bytes per element (the float ones are what merges can touch);
# tensor_index.py (header checks), merging/jobs.py (output sizes)
SAFETENSORS_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                     "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2,
                     "U32": 4, "U64": 8}

# option name (--dtype, --requantize) -> stored name; merging/plan.py
DTYPE_NAMES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}

# --requantize of a bitsandbytes checkpoint -> stored name: DTYPE_NAMES plus the GGML-style
# spellings f16 / f32; merging/encoded.py, codecs/bnb.py
REQUANTIZE_NAMES = {**DTYPE_NAMES, "f16": "F16", "f32": "F32"}

# stored name -> the name config.json's torch_dtype uses; merging/plan.py
CONFIG_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}

# stored float name -> mantissa bits: how finely the dtype resolves a value (the coarser dtype has
# fewer); the source of PRECISION, UNIT_ROUNDOFF and TORCH_UNIT_ROUNDOFF below
MANTISSA_BITS = {"F64": 52, "F32": 23, "F16": 10, "BF16": 7}

# stored float name -> unit roundoff 2**-(mantissa bits + 1); validation/e2e.py
UNIT_ROUNDOFF = {name: 2.0 ** -(MANTISSA_BITS[name] + 1) for name in FLOAT_DTYPES}


def _torch_tables() -> dict:
    import torch

    # stored name -> torch dtype, for every float a base may hold; merging/ (jobs users: plan,
    # run, streams, extract, copies, quantized), validation/merged.py and stored.py,
    # kernels/quant/gguf.py
    torch_dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                    "F64": torch.float64}
    tables = {
        "TORCH_DTYPES": torch_dtypes,
        # the torch dtypes of FLOAT_DTYPES (what the fused and bitsandbytes kernels take);
        # kernels/fold.py
        "FLOAT_TORCH_DTYPES": tuple(torch_dtypes[name] for name in FLOAT_DTYPES),
        # option name (fp32 / fp16 / bf16) -> torch dtype; adapter_io.parse_dtype, formats/gguf.py
        "OPTION_DTYPES": {option: torch_dtypes[DTYPE_NAMES[option]]
                          for option in ("fp32", "fp16", "bf16")},
        # stored name -> torch dtype of the tensors a codec reads and writes (floats, packed
        # bytes and words, int8 rows, fp8 codes); merging/encoded.py, codecs/
        "STORED_TORCH_DTYPES": {**{name: torch_dtypes[name] for name in FLOAT_DTYPES},
                                "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
                                "I32": torch.int32, "I64": torch.int64,
                                "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2},
        # torch float dtype -> mantissa bits; copies.py, algebra/combine.py
        "PRECISION": {torch_dtypes[name]: bits for name, bits in MANTISSA_BITS.items()},
        # torch float dtype -> unit roundoff: what a lossless-in-intent cast may cost per element;
        # validation/adapters.py
        "TORCH_UNIT_ROUNDOFF": {torch_dtypes[name]: 2.0 ** -(bits + 1)
                                for name, bits in MANTISSA_BITS.items()},
        # torch float dtype -> the integer dtype of the same width (bit-level views);
        # formats/gguf.py
        "SAME_WIDTH_INTS": {torch.float32: torch.int32, torch.float16: torch.int16,
                            torch.bfloat16: torch.int16},
    }
    # torch dtype -> option name (the inverse of OPTION_DTYPES); formats/gguf.py
    tables["OPTION_NAMES"] = {dtype: option for option, dtype in tables["OPTION_DTYPES"].items()}
    return tables


_TORCH_TABLES = ("TORCH_DTYPES", "FLOAT_TORCH_DTYPES", "OPTION_DTYPES", "OPTION_NAMES",
                 "STORED_TORCH_DTYPES", "PRECISION", "TORCH_UNIT_ROUNDOFF", "SAME_WIDTH_INTS")


def __getattr__(name: str):
    if name in _TORCH_TABLES:
        tables = _torch_tables()
        globals().update(tables)
        return tables[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
