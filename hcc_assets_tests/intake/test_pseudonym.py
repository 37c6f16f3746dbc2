"""The demo lake's pseudonym key: derived from the seed, written once, never over a real key."""

from hcc_assets.intake.pseudonym import (
    KEY_FILE_PARTS,
    is_demo_key,
    load_or_create_key,
    pseudonymize,
    write_demo_key,
)


def test_two_demo_lakes_with_one_seed_give_the_same_pseudonyms_and_another_seed_others(tmp_path, monkeypatch):
    monkeypatch.delenv("HCC_ASSETS_PSEUDONYM_KEY", raising=False)
    keys = []
    for lake, seed in (("a", 0), ("b", 0), ("c", 1)):
        key_file = tmp_path.joinpath(lake, *KEY_FILE_PARTS)
        assert write_demo_key(key_file, seed)
        assert not write_demo_key(key_file, seed + 5)  # an existing key is kept
        keys.append(load_or_create_key(key_file))
    assert keys[0] == keys[1] != keys[2]
    assert all(is_demo_key(key) for key in keys)
    assert pseudonymize("PATIENT-1", keys[0]) == pseudonymize("PATIENT-1", keys[1])
    assert pseudonymize("PATIENT-1", keys[0]) != pseudonymize("PATIENT-1", keys[2])


def test_a_lake_that_has_a_random_key_keeps_it(tmp_path, monkeypatch):
    monkeypatch.delenv("HCC_ASSETS_PSEUDONYM_KEY", raising=False)
    key_file = tmp_path.joinpath(*KEY_FILE_PARTS)
    random_key = load_or_create_key(key_file)
    assert not is_demo_key(random_key)
    assert not write_demo_key(key_file, 0)
    assert load_or_create_key(key_file) == random_key
