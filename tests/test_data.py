"""Adapters on the real label files, splits, pixels and metrics."""

import random

import numpy as np
import pytest
from scipy import stats
from scipy.optimize import curve_fit

from agiqa.data import load_dataset, make_split, normalize, read_pixels
from agiqa.errors import DatasetError
from agiqa.metrics import evaluate


@pytest.mark.parametrize("name,folder,n,target,first", [
    ("agiqa-3k", "agiqa-3k", 2982, "mos_quality", ("AttnGAN_normal_000.jpg", 0.965602553)),
    ("aigciqa-20k", "aigciqa-20k", 14000, "mos", ("DALLE2_0000.png", 3.6638868235)),
    ("aigciqa2023", "aigciqa2023", 2400, "quality_mos", ("0.png", 60.16417843)),
])
def test_adapters_read_the_real_label_files(name, folder, n, target, first, label_files):
    ds = load_dataset(name, label_files / folder)
    assert len(ds) == n and ds.target_column == target
    assert (ds.samples[0].key, ds.samples[0].mos) == first


def test_agiqa3k_alignment_target_and_crlf(tmp_path, label_files):
    ds = load_dataset("agiqa-3k", label_files / "agiqa-3k", target="mos_align")
    assert ds.samples[0].mos == pytest.approx(0.40889324)
    crlf = tmp_path / "data.csv"
    crlf.write_bytes((label_files / "agiqa-3k/data.csv").read_bytes().replace(b"\n", b"\r\n"))
    ds2 = load_dataset("agiqa-3k", tmp_path)
    assert ds2.samples == load_dataset("agiqa-3k", label_files / "agiqa-3k").samples


def test_paper_split_is_the_official_shuffle(label_files):
    ds = load_dataset("agiqa-3k", label_files / "agiqa-3k")
    split = make_split(ds, "paper")
    index = list(range(len(ds)))
    random.seed(20)
    random.shuffle(index)
    keys = ds.keys
    a, b = int(len(ds) * 0.7), int(len(ds) * 0.8)  # truncated, as dataset_general
    assert (a, b) == (2087, 2385)
    assert split.train == [keys[i] for i in index[:a]]
    assert split.val == [keys[i] for i in index[a:b]]
    assert split.test == [keys[i] for i in index[b:]]


def test_random_ratios_cut_where_int_truncates():
    from agiqa.data.splits import paper_split

    for n in (10, 30, 50, 2982, 14000):
        tr, va, te = paper_split(n, 20, (0.7, 0.1, 0.2))
        assert (len(tr), len(va), len(te)) == (int(n * 0.7), int(n * 0.8) - int(n * 0.7),
                                               n - int(n * 0.8))
    tr, va, te = paper_split(30, 20, (0.6, 0.2, 0.2))
    assert (len(tr), len(va), len(te)) == (18, 6, 6)


def test_split_files_of_agiqa3k(label_files):
    ds = load_dataset("agiqa-3k", label_files / "agiqa-3k")
    split = make_split(ds, "files")
    assert (len(split.train), len(split.val), len(split.test)) == (1789, 596, 597)
    assert not set(split.train) & set(split.test)


def test_csv_adapter_defaults_and_errors(tmp_path):
    (tmp_path / "labels.csv").write_text('filename,quality,extra\n"a,b.png",3\nc.png,4.5\n')
    ds = load_dataset("csv", tmp_path)
    assert [(s.key, s.mos) for s in ds.samples] == [("a,b.png", 3.0), ("c.png", 4.5)]
    (tmp_path / "bad.csv").write_text("foo,bar\nx,1\n")
    with pytest.raises(DatasetError, match="no image column .* columns: foo, bar"):
        load_dataset("csv", tmp_path, labels=tmp_path / "bad.csv")
    (tmp_path / "esc.csv").write_text("image,mos\n../../etc/passwd,1\n")
    with pytest.raises(DatasetError, match="line 2: image path '../../etc/passwd' escapes"):
        load_dataset("csv", tmp_path, labels=tmp_path / "esc.csv")
    (tmp_path / "nan.csv").write_text("image,mos\na.png,high\n")
    with pytest.raises(DatasetError,
                       match="line 2: score 'high' in column 'mos' is not a finite number"):
        load_dataset("csv", tmp_path, labels=tmp_path / "nan.csv")


def test_unknown_preset_suggests_close_names(tmp_path):
    from agiqa.errors import ConfigError

    with pytest.raises(ConfigError, match="did you mean agiqa-3k"):
        load_dataset("agiqa3k", tmp_path)


def test_read_pixels_matches_opencv_on_real_photos(photo_folder):
    cv2 = pytest.importorskip("cv2")
    root, _ = photo_folder
    for key in ["astronaut.jpg", "chelsea.png", "rocket.bmp", "coffee.webp",
                "nested/deeper/chelsea_exif.jpg"]:
        ref = cv2.cvtColor(cv2.imread(str(root / key), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        ref = cv2.resize(ref, (224, 224), interpolation=cv2.INTER_CUBIC).transpose(2, 0, 1)
        ours = read_pixels(root / key).numpy()
        diff = np.abs(ref.astype(int) - ours.astype(int))
        assert ours.shape == (3, 224, 224) and ours.dtype == np.uint8
        assert diff.max() <= 1 and (diff == 0).mean() >= 0.99, key
    x = normalize(read_pixels(root / "astronaut.jpg"))
    assert -1.0 <= x.min() and x.max() <= 1.0


def _official_performance_fit(y_label, y_output):
    def logistic_func(X, b1, b2, b3, b4):
        return b2 + np.divide(b1 - b2, 1 + np.exp(np.negative(np.divide(X - b3, np.abs(b4)))))

    beta = [np.max(y_label), np.min(y_label), np.mean(y_output), 0.5]
    popt, _ = curve_fit(logistic_func, y_output, y_label, p0=beta, maxfev=100000000)
    fitted = logistic_func(y_output, *popt)
    return (stats.pearsonr(fitted, y_label)[0], stats.spearmanr(y_output, y_label)[0],
            stats.kendalltau(y_output, y_label)[0], np.sqrt(((fitted - y_label) ** 2).mean()))


def test_metrics_equal_the_official_formula():
    rng = np.random.default_rng(0)
    mos = rng.uniform(0, 5, 300)
    pred = np.tanh(mos - 2.5) + rng.normal(0, 0.3, 300)
    m = evaluate(pred, mos)
    plcc, srcc, krcc, rmse = _official_performance_fit(mos, pred)
    assert m["srcc"] == pytest.approx(srcc, abs=1e-12)
    assert m["krcc"] == pytest.approx(krcc, abs=1e-12)
    assert m["plcc"] == pytest.approx(plcc, abs=1e-9)
    assert m["rmse"] == pytest.approx(rmse, abs=1e-9)
    assert m["plcc_raw"] == pytest.approx(stats.pearsonr(pred, mos)[0])
    assert m["plcc"] > m["plcc_raw"]


def test_label_columns_match_whatever_their_case_and_ambiguity_is_refused(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "labels.csv").write_text("Image,MOS\na.png,3.5\n")
    ds = load_dataset("csv", tmp_path)
    assert ds.keys == ["a.png"] and ds.samples[0].mos == 3.5 and ds.target_column == "MOS"
    ds = load_dataset("csv", tmp_path, image_column="IMAGE", score_column="mos")
    assert ds.target_column == "MOS"
    (tmp_path / "labels.csv").write_text("image,Image,mos\na.png,b.png,3.5\n")
    with pytest.raises(DatasetError, match="line 1: columns 'image', 'Image' differ only in "
                                           "case; which is the image column is ambiguous"):
        load_dataset("csv", tmp_path)
