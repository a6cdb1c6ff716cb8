"""The named presets in configs/ agree with the code presets and load into config objects."""

import json

import pytest

from pam_jax import configs
from pam_jax.sam2.config import HIERA, OFFICIAL, SAM2Config


def test_every_official_sam2_checkpoint_has_a_preset():
    assert set(OFFICIAL) <= set(configs.names())
    for name, (size, version) in OFFICIAL.items():
        cfg = configs.load(name)
        assert isinstance(cfg, SAM2Config)
        assert cfg.version == version and cfg.hiera == HIERA[size]
        assert cfg.no_obj_embed_spatial == (version == "2.1")


@pytest.mark.parametrize("name", configs.names())
def test_preset_files_match_code(name):
    kind, cfg = configs._presets()[name]
    loaded = configs.load(name)
    assert loaded == cfg, f"configs/{name}.json is stale: run `python -m pam_jax.configs`"
    assert type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # JSON round trip


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="available: .*sam2.1_hiera_large"):
        configs.load("sam3_huge")
