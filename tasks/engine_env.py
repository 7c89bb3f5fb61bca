"""The environment a local engine starts with: built from an allowlist, never `**os.environ`.

Model code can run inside the engine (`trust_remote_code`), so the gateway's own secrets
(`LLMGW_*`: the admin token, the HF token) and its cloud credentials (`AWS_*`, `GOOGLE_*`,
`AZURE_*`, ...) must not reach it unless the operator asks for them, by name or pattern in
`env_passthrough`, or by value in `env`.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping

# Taken from the gateway's environment as they are: what a process needs to run and to find its
# libraries, locale and time zone.
PASS_NAMES = frozenset({"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "LD_LIBRARY_PATH"})
# Engine knobs an operator sets in the gateway's environment (VLLM_CPU_KVCACHE_SPACE, HF_HOME,
# HF_HUB_OFFLINE, ...), and the locale.
PASS_PREFIXES = ("LC_", "VLLM_", "HF_")
# Even under an allowed prefix, a name that looks like a credential stays behind (HF_TOKEN,
# VLLM_API_KEY): the engine's secrets come from the launch spec.
_CREDENTIAL = re.compile(r"TOKEN|SECRET|PASSWORD|CREDENTIAL|(^|_)KEY($|_)")


def _allowed(name: str, passthrough: Iterable[str]) -> bool:
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in passthrough):
        return True
    if name.startswith("LLMGW_") or _CREDENTIAL.search(name):
        return False
    return name in PASS_NAMES or name.startswith(PASS_PREFIXES)


def engine_environment(
    environ: Mapping[str, str],
    *,
    passthrough: Iterable[str] = (),
    defaults: Mapping[str, str],
    configured: Mapping[str, str],
    forced: Mapping[str, str],
    secrets: Mapping[str, str],
) -> dict[str, str]:
    """`environ` filtered by the allowlist (plus `passthrough` patterns), then the provider's
    `defaults` (TMPDIR), the operator's `configured` values, what the provider must set
    (`forced`: CUDA_VISIBLE_DEVICES) and the model's `secrets`; later ones win."""
    patterns = tuple(passthrough)
    base = {k: v for k, v in environ.items() if _allowed(k, patterns)}
    return {**base, "VLLM_NO_USAGE_STATS": "1", **defaults, **configured, **forced, **secrets}
