from hcc_assets.stats.split import stratified_split


def test_split_is_stratified_seeded_and_order_independent():
    ids = [f"pt-{i:03d}" for i in range(40)]
    labels = [i % 2 == 0 for i in range(40)]
    split = stratified_split(ids, labels, 0.2, seed=7)
    validation = [pid for pid, s in split.items() if s == "validation"]
    assert len(validation) == 8
    assert sum(labels[ids.index(pid)] for pid in validation) == 4  # 4 HCC, 4 healthy
    reversed_split = stratified_split(ids[::-1], labels[::-1], 0.2, seed=7)
    assert reversed_split == split
    assert stratified_split(ids, labels, 0.2, seed=8) != split
