import pytest

from prunus.errors import SpecError
from prunus.core.spec import NM, Block, Channel, SparsitySpec, Unstructured, format_sparsity, parse_sparsity


@pytest.mark.parametrize("text,pattern,ratio", [
    ("0.5", Unstructured(), 0.5), ("50%", Unstructured(), 0.5), (".25", Unstructured(), 0.25),
    ("0", Unstructured(), 0.0), ("1", Unstructured(), 1.0), ("100%", Unstructured(), 1.0),
    ("unstructured@0.7", Unstructured(), 0.7), (0.3, Unstructured(), 0.3),
    ("2:4", NM(2, 4), 0.5), ("4:8", NM(4, 8), 0.5), ("1:4", NM(1, 4), 0.75), ("3:4", NM(3, 4), 0.25),
    ("4x4@0.5", Block(4, 4), 0.5), ("8x1@50%", Block(8, 1), 0.5), ("block2x8@0.25", Block(2, 8), 0.25),
    ("channel@0.3", Channel(), 0.3), ("channel@30%", Channel(), 0.3),
])
def test_parse_valid(text, pattern, ratio):
    p, r = parse_sparsity(text)
    assert p == pattern and r == pytest.approx(ratio)
    assert parse_sparsity(format_sparsity(p, r)) == (p, pytest.approx(r))


@pytest.mark.parametrize("text", ["1.5", "-0.1", "5:4", "0:4", "2:0", "abc", "", "4:4", "150%",
                                  "nan", "4x0@0.5", "4x4@1.2", "2:4:8", "0.5.1"])
def test_parse_invalid_is_one_line_spec_error(text):
    with pytest.raises(SpecError) as e:
        parse_sparsity(text)
    assert "\n" not in str(e.value)


def test_spec_rules():
    assert SparsitySpec.parse("2:4").sparsity == 0.5
    with pytest.raises(SpecError, match="allocation"):
        SparsitySpec.parse("2:4", allocation="erk")
    # the spec holds the name; the budget registry checks it where the spec is used
    from prunus import budgets

    with pytest.raises(SpecError, match="unknown allocation 'nope'; choose one of erk, global, owl, uniform"):
        budgets.get(SparsitySpec.parse("0.5", allocation="nope").allocation)
    with pytest.raises(SpecError):
        SparsitySpec(NM(2, 4), 0.3)
    assert str(SparsitySpec.parse("0.5", "owl")) == "0.5 (owl)"
    s = SparsitySpec.parse("50%")
    with pytest.raises(Exception):
        s.sparsity = 0.1  # frozen
