"""fcn_jax.data: annotation format, loader (inference preprocessing + crops/flips), synthetic
dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from converters import CaffeFormatError
from fcn_jax import data as D
from fcn_jax.preprocess import caffe_transformer, imagenet_mean_bgr, preprocess

# ----------------------------------------------------------------------------- annotations


def test_annotations_round_trip_and_relative_paths(tmp_path):
    recs = [("a.png", [[1, 2, 30, 40, 1], [5.5, 6, 7, 8.25, 3]]), ("/abs/b.jpg", [])]
    path = tmp_path / "sub" / "ann.jsonl"
    path.parent.mkdir()
    D.write_annotations(path, recs)
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"image": "a.png",
                                    "boxes": [[1.0, 2.0, 30.0, 40.0, 1], [5.5, 6.0, 7.0, 8.25, 3]]}
    got = D.read_annotations(path)
    assert got[0][0] == str(tmp_path / "sub" / "a.png")  # relative to the file
    assert got[1][0] == "/abs/b.jpg"
    np.testing.assert_array_equal(got[0][1], np.array(recs[0][1], float))
    assert got[1][1].shape == (0, 5)


@pytest.mark.parametrize("line, where, words", [
    ("{not json", "line 2", "invalid JSON"),
    ('{"boxes": []}', "line 2", "image"),
    ('{"image": "x.png", "boxes": [[0, 0, 5, 5]]}', "line 2: boxes[0]", "x0, y0, x1, y1, label"),
    ('{"image": "x.png", "boxes": [[5, 0, 5, 5, 1]]}', "line 2: boxes[0]", "empty box"),
    ('{"image": "x.png", "boxes": [[0, 0, 5, 5, 0]]}', "line 2: boxes[0]", "label"),
    ('{"image": "x.png", "boxes": [[0, 0, 5, 5, 1.5]]}', "line 2: boxes[0]", "label"),
    ('{"image": "x.png", "boxes": [[0, 0, "5", 5, 1]]}', "line 2: boxes[0]", "numbers"),
    ('{"image": "x.png", "boxes": {"a": 1}}', "line 2: boxes", "list"),
    # values: a label of 1e9 would build 1e9 class names; coordinates near 1e308 overflow
    ('{"image": "x.png", "boxes": [[0, 0, 5, 5, 1000000000]]}', "line 2: boxes[0]",
     "label must be an integer from 1 to 65535"),
    ('{"image": "x.png", "boxes": [[0, 0, 5, 5, 1e300]]}', "line 2: boxes[0]", "label"),
    ('{"image": "x.png", "boxes": [[0, 0, 1e308, 5, 1]]}', "line 2: boxes[0]",
     "within +-16777216"),
    ('{"image": "x.png", "boxes": [[-1e308, 0, 5, 5, 1]]}', "line 2: boxes[0]", "within"),
    ('{"image": "x.png", "boxes": [[0, 0, NaN, 5, 1]]}', "line 2: boxes[0]", "finite"),
    ('{"image": "x.png", "boxes": [[0, 0, Infinity, 5, 1]]}', "line 2: boxes[0]", "finite"),
    ('{"image": "x.png", "boxes": [[0, 0, 5, 5, NaN]]}', "line 2: boxes[0]", "label"),
    ('{"image": "x.png", "boxes": [[0, 0, 1' + "0" * 400 + ', 5, 1]]}', "line 2: boxes[0]",
     "out of range"),
    ('[' * 100000, "line 2", "invalid JSON"),
])
def test_bad_annotation_lines_give_one_line_errors(tmp_path, line, where, words):
    path = tmp_path / "ann.jsonl"
    path.write_text('{"image": "ok.png", "boxes": []}\n' + line + "\n")
    with pytest.raises(CaffeFormatError) as e:
        D.read_annotations(path)
    msg = str(e.value)
    assert "\n" not in msg and "ann.jsonl" in msg and where in msg and words in msg


def test_annotation_dataset_errors(tmp_path):
    path = tmp_path / "ann.jsonl"
    path.write_text("# only a comment\n\n")
    with pytest.raises(CaffeFormatError, match="no annotated images"):
        D.AnnotationDataset(path)
    path.write_text('{"image": "missing.png", "boxes": [[0, 0, 4, 4, 2]]}\n')
    # every image header is read up front: a missing image is named with its line at once
    with pytest.raises(CaffeFormatError, match=r"ann.jsonl: line 1: image: .*missing.png.*"
                       "No such file"):
        D.AnnotationDataset(path)
    ds = D.AnnotationDataset(path, check_images=False)
    assert len(ds) == 1 and ds.num_classes() == 3
    with pytest.raises(CaffeFormatError, match="line 1: image: .*No such file"):
        ds[0]
    with pytest.raises(CaffeFormatError, match="cannot read"):
        D.read_annotations(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_examples_are_deterministic_and_valid():
    a, b = D.synthetic_example(3, 7), D.synthetic_example(3, 7)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.boxes, b.boxes)
    assert not np.array_equal(a.image, D.synthetic_example(3, 8).image)
    assert not np.array_equal(a.image, D.synthetic_example(4, 7).image)
    counts = []
    for i in range(30):
        ex = D.synthetic_example(0, i, size=(300, 360), object_size=(60, 120))
        assert ex.image.shape == (300, 360, 3) and ex.image.dtype == np.uint8
        b = ex.boxes
        assert b.shape[1] == 5
        assert np.all(b[:, 0] >= 0) and np.all(b[:, 2] <= 360)
        assert np.all(b[:, 1] >= 0) and np.all(b[:, 3] <= 300)
        long_side = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])
        assert np.all((long_side >= 59) & (long_side <= 121))
        assert set(b[:, 4].astype(int)) <= {1, 2, 3}
        counts.append(len(b))
    assert 0 in counts and max(counts) >= 2  # empty images and several objects both occur


def test_synthetic_objects_look_like_their_class():
    """The pixels inside a box have the colour statistics of that class's source picture
    (independent of how the paste resamples): nearest class mean colour is the box label."""
    import skimage.data

    src = {1: skimage.data.chelsea()[20:290, 90:370], 2: skimage.data.coffee()[10:330, 90:500],
           3: skimage.data.rocket()[30:427, 190:450]}
    means = {k: v.reshape(-1, 3).mean(0) for k, v in src.items()}
    checked = 0
    for i in range(12):
        ex = D.synthetic_example(5, i)
        for x0, y0, x1, y1, lab in ex.boxes.astype(int):
            m = ex.image[y0:y1, x0:x1].reshape(-1, 3).mean(0)
            nearest = min(means, key=lambda k: np.linalg.norm(means[k] - m))
            assert nearest == lab
            checked += 1
    assert checked >= 5


def test_write_synthetic_dataset_round_trips_through_the_loader(tmp_path):
    path = D.write_synthetic_dataset(tmp_path / "syn", 3, seed=2, size=(200, 220),
                                     object_size=(50, 90))
    ds = D.AnnotationDataset(path)
    assert len(ds) == 3 and ds.num_classes() == 4
    for i in range(3):
        ex = D.synthetic_example(2, i, size=(200, 220), object_size=(50, 90))
        got = ds[i]
        np.testing.assert_array_equal(got.boxes, ex.boxes)
        np.testing.assert_allclose(got.image, ex.image / 255.0, atol=1e-6)  # PNG is lossless


# ----------------------------------------------------------------------------- loading


def _marker_image(h, w, boxes):
    im = np.zeros((h, w, 3), np.float32)
    for x0, y0, x1, y1, _ in boxes:
        im[int(y0):int(y1), int(x0):int(x1)] = 1.0
    return im


def test_augment_moves_boxes_with_the_pixels():
    """Property: after a random crop/flip the returned boxes cover exactly the marked pixels."""
    boxes = np.array([[10, 20, 40, 50, 1], [60, 5, 90, 35, 2]], float)
    im = _marker_image(80, 100, boxes)
    aug = D.AugmentConfig(min_visible=0.0)
    for seed in range(40):
        rng = np.random.default_rng(seed)
        crop, b = D.augment_example(im, boxes, rng, (64, 72), aug)
        assert crop.shape == (64, 72, 3)
        assert np.all(b[:, :4] >= 0) and np.all(b[:, [2]] <= 72) and np.all(b[:, [3]] <= 64)
        np.testing.assert_array_equal(_marker_image(64, 72, b), crop)
        assert set(b[:, 4]) <= {1, 2}


def test_augment_drops_mostly_cropped_boxes():
    boxes = np.array([[0, 0, 10, 10, 1]], float)
    im = np.zeros((40, 40, 3), np.float32)
    seen = set()
    for seed in range(60):
        _, b = D.augment_example(im, boxes, np.random.default_rng(seed), (32, 32),
                                 D.AugmentConfig(flip=False, min_visible=0.5))
        if len(b):
            x0, y0, x1, y1, _ = b[0]
            assert (x1 - x0) * (y1 - y0) >= 50  # at least half of the 100 px box remains
            seen.add(True)
        else:
            seen.add(False)
    assert seen == {True, False}


def test_prepare_example_is_the_inference_preprocessing():
    img = np.random.default_rng(0).random((120, 160, 3)).astype(np.float32)
    boxes = np.array([[16, 12, 80, 60, 2]], float)
    cfg = D.input_transformer((60, 80))
    blob, b = D.prepare_example(D.Example(img, boxes), cfg)
    ref = preprocess(caffe_transformer((3, 60, 80), mean=imagenet_mean_bgr()), img)
    np.testing.assert_array_equal(blob, ref)
    np.testing.assert_allclose(b, [[8, 6, 40, 30, 2]])  # boxes follow the 2x resize
    # uint8 images are read as /255 like load_image
    u8 = (img * 255).astype(np.uint8)
    blob8, _ = D.prepare_example(D.Example(u8, boxes), cfg)
    np.testing.assert_allclose(blob8, preprocess(cfg, u8 / np.float32(255)), atol=1e-4)


def test_batches_are_pure_functions_of_step_and_seed():
    ds = D.SyntheticDataset(5, seed=0, size=(96, 96), object_size=(30, 50))
    idx = np.concatenate([D.batch_indices(5, s, 5, seed=1) for s in range(3)])
    for e in range(3):  # every epoch is a permutation of the dataset
        assert sorted(idx[5 * e:5 * e + 5]) == list(range(5))
    np.testing.assert_array_equal(D.batch_indices(5, 7, 3, seed=1),
                                  D.batch_indices(5, 7, 3, seed=1))
    cfg = D.input_transformer((64, 64))
    a = D.train_batch(ds, 3, batch_size=2, cfg=cfg, seed=4)
    b = D.train_batch(ds, 3, batch_size=2, cfg=cfg, seed=4)
    c = D.train_batch(ds, 4, batch_size=2, cfg=cfg, seed=4)
    assert a[0].shape == (2, 3, 64, 64) and a[0].dtype == np.float32
    np.testing.assert_array_equal(a[0], b[0])
    for x, y in zip(a[1], b[1], strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    ims, bx = D.eval_batch(ds, 3, 4, cfg)
    assert ims.shape == (2, 3, 64, 64) and len(bx) == 2
    assert len(ds) == 5 and ds.num_classes() == 4
    with pytest.raises(IndexError):
        ds[5]


# ----------------------------------------------------------------------------- round 2


def _png(path, h: int, w: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(path)


def test_a_box_wholly_outside_its_image_is_refused_with_file_and_line(tmp_path):
    _png(tmp_path / "a.png", 40, 60)
    path = tmp_path / "ann.jsonl"
    path.write_text('{"image": "a.png", "boxes": [[0, 0, 10, 10, 1]]}\n'
                    '# a comment\n'
                    '{"image": "a.png", "boxes": [[5, 5, 9, 9, 1], [70, 5, 90, 20, 2]]}\n')
    with pytest.raises(CaffeFormatError) as e:
        D.AnnotationDataset(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: line 3: boxes[1]: box [70.0, 5.0, 90.0, 20.0] lies wholly "
                          "outside its 60x40 image 'a.png'"), msg
    # partly outside is fine (cropping clips it); touching the edge from outside is not
    path.write_text('{"image": "a.png", "boxes": [[-5, -5, 3, 3, 1], [50, 30, 70, 50, 1]]}\n')
    assert len(D.AnnotationDataset(path)) == 1
    path.write_text('{"image": "a.png", "boxes": [[60, 0, 70, 10, 1]]}\n')
    with pytest.raises(CaffeFormatError, match="line 1: boxes.0.: .* wholly outside"):
        D.AnnotationDataset(path)


def test_non_images_and_fifos_in_annotations_are_named_up_front(tmp_path):
    import os

    (tmp_path / "t.png").write_text("text, not an image")
    os.mkfifo(tmp_path / "f.png")
    path = tmp_path / "ann.jsonl"
    for name, why in [("t.png", "not an image file"), ("f.png", "not a regular file (a FIFO)")]:
        path.write_text(json.dumps({"image": name, "boxes": []}) + "\n")
        with pytest.raises(CaffeFormatError) as e:
            D.AnnotationDataset(path)
        msg = str(e.value)
        assert msg.startswith(f"{path}: line 1: image: ") and why in msg, msg
        assert "imageio" not in msg and "pip install" not in msg
    os.mkfifo(tmp_path / "ann_fifo.jsonl")
    with pytest.raises(CaffeFormatError, match="not a regular file"):
        D.read_annotations(tmp_path / "ann_fifo.jsonl")


def test_sparse_labels_are_explained(tmp_path):
    from fcn_jax.commands.finetune import FinetuneConfig, _datasets

    for i in range(4):
        _png(tmp_path / f"{i}.png", 20, 20)
    path = tmp_path / "ann.jsonl"
    path.write_text("".join(json.dumps({"image": f"{i}.png", "boxes": [[0, 0, 5, 5, lab]]})
                            + "\n" for i, lab in enumerate((3, 7, 3, 7))))
    assert D.label_gaps({3, 7}) == [1, 2, 4, 5, 6]
    said: list[str] = []
    train, val, names = _datasets(FinetuneConfig(out=str(tmp_path / "o"), steps=1,
                                                 data=str(path), val_fraction=0.25), said.append)
    assert len(names) == 8 and names[0] == "background"
    assert len(said) == 1 and said[0].startswith(f"warning: {path}: the boxes use labels [3, 7]"
                                                 ", so the net gets 8 classes")
    assert "labels 1, 2, 4, 5, 6 have no boxes" in said[0] and "Renumber the labels 1..2" \
        in said[0]
