"""``import skyrl_callbacks`` and a plain save/resume work with only torch + fsspec (+ safetensors).

Runs in a subprocess whose import system refuses every optional dependency, so a module-level
import of any of them anywhere in the core fails this test.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

OPTIONAL = ["lightning", "pytorch_lightning", "accelerate", "transformers", "tokenizers", "torchdata", "omegaconf",
            "yaml", "s3fs", "gcsfs", "xxhash", "megatron", "tqdm", "boto3", "botocore", "aiohttp"]


def test_core_imports_and_saves_without_optional_packages(tmp_path):
    code = textwrap.dedent(
        f"""
        import importlib.abc, sys
        BLOCKED = {OPTIONAL!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked optional dependency {{name}}")
        sys.meta_path.insert(0, Block())
        import torch
        import skyrl_callbacks
        from skyrl_callbacks import CheckpointConfig, CheckpointManager, MissingDependencyError
        from skyrl_callbacks.roles import discover_roles
        m = torch.nn.Module(); m.policy = torch.nn.Linear(3, 3)
        mgr = CheckpointManager(CheckpointConfig(ckpt_path={str(tmp_path)!r} + "/c", export_path={str(tmp_path)!r} + "/e"))
        mgr.save(1, discover_roles(m))
        m2 = torch.nn.Module(); m2.policy = torch.nn.Linear(3, 3)
        assert CheckpointManager(CheckpointConfig(ckpt_path={str(tmp_path)!r} + "/c")).resume(discover_roles(m2)).step == 1
        assert torch.equal(m.policy.weight, m2.policy.weight)
        mgr.export_hf(1, discover_roles(m)[0])   # safetensors only, no transformers
        try:
            CheckpointManager(CheckpointConfig(ckpt_path="s3://bucket/x"))
        except MissingDependencyError as exc:
            assert "skyrl-callbacks[s3]" in str(exc), exc
        else:
            raise AssertionError("s3:// without s3fs must name the extra")
        print("OK")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout
