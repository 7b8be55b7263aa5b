"""The glossary: the terms the pages use, one sentence each, and the page that lists them."""

from ui.glossary import GLOSSARY, GROUPS, TERMS, by_group

ISSUE_TERMS = ["one_minus_cos", "residual_stream", "cka", "angular_distance", "logit_lens", "kl", "top1_agreement",
               "entropy", "bos", "attention_sink", "perplexity", "bits_per_byte", "psnr", "drop",
               "depth_layer_block", "relative_update", "sparsity", "quantization", "early_exit"]


def test_glossary_covers_the_terms_the_pages_use_in_one_line_each():
    assert set(ISSUE_TERMS) <= set(GLOSSARY)
    for key, text in GLOSSARY.items():
        assert "\n" not in text and text.endswith(".") and 40 < len(text) < 320, key
        assert TERMS[key].group in GROUPS


def test_terms_are_grouped_and_alphabetical():
    groups = by_group()
    assert list(groups) == list(GROUPS)
    assert sum(len(terms) for terms in groups.values()) == len(TERMS)
    for terms in groups.values():
        names = [t.name.casefold() for t in terms]
        assert names == sorted(names)


def test_glossary_page_lists_every_term():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file("../views/glossary.py").run(timeout=30)
    assert not at.exception
    assert at.title[0].value == "Glossary"
    assert [s.value for s in at.subheader] == list(GROUPS)
    shown = " ".join(m.value for m in at.markdown)
    assert all(f"**{term.name}**" in shown for term in TERMS.values())
