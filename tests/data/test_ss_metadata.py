from __future__ import annotations

from sd_lora.data.ss_metadata import distinct_labels


def test_distinct_labels_add_parent_folders_only_where_names_clash():
    paths = [("home", "a", "images"), ("home", "b", "images"), ("home", "a", "10_zk"), ("home", "a", "images")]
    assert distinct_labels(paths) == ["a/images", "b/images", "10_zk", "a/images"]  # given twice: one folder


def test_distinct_labels_keep_the_shortest_asked_and_avoid_taken_labels():
    root, sub = ("srv", "data"), ("srv", "data", "chars", "3_me")
    assert distinct_labels([root, sub], [0, 2]) == ["data", "chars/3_me"]
    assert distinct_labels([("x", "reg"), ("x", "reg", "1_p")], [0, 1], taken={"reg", "1_p"}) == ["x/reg", "reg/1_p"]
    assert distinct_labels([()]) == ["."]  # the file system's root
    assert distinct_labels([("only",)], taken={"only"}) == ["only"]  # nothing left to add: the whole path
