"""Representations of image models: ink mass and stroke thickness on hand-made images, the
median split, the control task's cells, and the stage probes on a tiny CNN and denoiser."""

import pytest
import torch

from analysis.representations.image_labels import halves, ink_mass, nearest_prototype, stroke_thickness
from analysis.representations.stage_probes import IMAGE_PROPERTIES, probe_images, probe_stages
from lib.errors import CapabilityError


def canvas(*pixels, value=1.0):
    """One 8x8 image [1, 1, 8, 8] with `value` at the (row, column) pixels given."""
    image = torch.zeros(1, 1, 8, 8)
    for r, c in pixels:
        image[0, 0, r, c] = value
    return image


def test_stroke_thickness_on_hand_made_images():
    vertical_bar = canvas(*[(r, c) for r in range(1, 7) for c in (3, 4)])  # 2 wide, 6 tall
    horizontal_bar = canvas(*[(r, c) for r in (2, 3, 4) for c in range(0, 8)])  # 3 tall, across the image
    diagonal = canvas(*[(i, i) for i in range(8)])  # one pixel wide
    square = canvas(*[(r, c) for r in (2, 3, 4) for c in (2, 3, 4)])
    cross = canvas(*[(3, c) for c in range(1, 6)], *[(r, 3) for r in range(1, 6)])  # arms 1 wide, 5 long
    faint = canvas(*[(r, 3) for r in range(8)], value=0.4)  # below the ink threshold
    images = torch.cat([vertical_bar, horizontal_bar, diagonal, square, cross, faint])
    thickness = stroke_thickness(images)
    assert thickness[:4].tolist() == [2.0, 3.0, 1.0, 3.0]
    assert thickness[4] == pytest.approx((8 * 1 + 5) / 9)  # the crossing pixel reads the arm's length, 5
    assert thickness[5] == 0  # no ink
    assert ink_mass(images).tolist() == pytest.approx([12.0, 24.0, 8.0, 9.0, 9.0, 3.2])


def test_halves_cut_at_the_training_median():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0, -5.0])
    train = torch.tensor([True, True, True, True, False, False])
    codes, names = halves(values, train, " px", words=("thin", "thick"))
    assert codes.tolist() == [0, 0, 1, 1, 1, 0]  # median of 1..4 is 2.5; test values are only classified
    assert names == ("thin (< 2.50 px)", "thick (>= 2.50 px)")


def test_every_prototype_is_its_own_nearest():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(60, 1, 8, 8, generator=gen)
    train = torch.arange(60) < 40
    cells = nearest_prototype(images, train, n_prototypes=10, seed=3)
    assert cells.max() < 10 and torch.equal(cells, nearest_prototype(images, train, n_prototypes=10, seed=3))
    assert len(cells[train].unique()) == 10  # each prototype (a training image) lands in its own cell


def test_stage_probes_on_a_tiny_cnn(tiny_cnn):
    images = probe_images(tiny_cnn)
    result = probe_stages(tiny_cnn, images)
    stages = tuple(name for name, _ in tiny_cnn.structure.stages)
    assert result.depth_labels == ("input", *stages) and result.properties == IMAGE_PROPERTIES
    assert result.accuracy.shape == result.control.shape == (3, len(stages) + 1)
    assert ((result.accuracy >= 0) & (result.accuracy <= 1)).all()
    assert int(result.n_test[0]) == int((~images.train).sum()) and result.unit == "image"
    # the input alone: ink mass is a linear function of the pixels and the class nearly so
    assert result.accuracy[1, 0] > 0.85 and result.accuracy[0, 0] > 0.8 > 3 * result.majority[0]
    for p in IMAGE_PROPERTIES:  # the control task's classes are fixed per cell
        from analysis.representations.probes import control_labels

        control = control_labels(images.labels[p], images.cells, len(images.classes[p]))
        for cell in images.cells.unique()[:20]:
            assert len(control[images.cells == cell].unique()) == 1


def test_denoiser_reads_its_evaluation_images_and_properties_of_the_clean_digit(tmp_path):
    from lib.data import digits_batch
    from lib.models import load_model, save_image_model
    from lib.zoo.nets import DigitsDenoiser

    torch.manual_seed(0)
    save_image_model(DigitsDenoiser(width=4), "digits-denoiser", tmp_path, width=4)
    handle = load_model(str(tmp_path))
    images = probe_images(handle)
    evaluation = digits_batch(denoise=True)
    assert torch.equal(images.inputs[~images.train], evaluation.images)  # exactly the evaluation batch
    assert torch.equal(images.clean[~images.train], evaluation.targets)
    assert torch.equal(images.labels["ink_mass"], halves(ink_mass(images.clean), images.train)[0])
    result = probe_stages(handle, images)
    assert result.depth_labels[-1] == "out" and "noisy copies" in result.source


def test_a_language_model_is_refused(tiny_lm):
    with pytest.raises(CapabilityError, match="image model"):
        probe_stages(tiny_lm)


def test_image_sentences_state_the_numbers(tiny_cnn):
    from analysis.representations import plots, report

    result = probe_stages(tiny_cnn)
    sentences = report.property_sentences(result)
    best = int(result.accuracy[0].argmax())
    assert sentences[0].startswith(f"Class: best at {result.depth_name(best)}, "
                                   f"{100 * float(result.accuracy[0, best]):.0f}% of test images")
    assert f"nearest prototype {100 * float(result.token_alone[0]):.0f}%" in sentences[0]
    assert "the nearest of 100 prototypes" in report.labelled_sentence(result)
    assert "Selectivity" in report.selectivity_sentence(result)
    figure = plots.probe_lines(result)
    assert list(figure.data[0].x) == list(result.depth_labels)
    assert {t.name for t in figure.data} == {"probe", "control task", "nearest prototype", "majority class"}
