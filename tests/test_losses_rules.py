"""The rule sets of the FastCLIP family (src/fast_clip/losses/rules.py): one object per --fastclip_rules value, chosen
when a loss is built. What each rule set computes is tested through the losses (test_losses.py: exact,
test_losses_official.py: official against an independent re-implementation)."""
import pytest
import torch

from fast_clip.losses import FASTCLIP_RULES, LossConfig, build_loss
from fast_clip.losses.rules import RULES, ExactRules, OfficialRules


def test_one_rules_object_per_flag_value():
    assert set(RULES) == set(FASTCLIP_RULES)
    assert isinstance(RULES["official"], OfficialRules) and isinstance(RULES["exact"], ExactRules)
    assert all(rules.name == name for name, rules in RULES.items())


@pytest.mark.parametrize("rules", FASTCLIP_RULES)
@pytest.mark.parametrize("variant", ["fastclip-v2", "fastclip-v3", "openclip", "sdm"])
def test_the_loss_asks_the_rules_of_its_config(variant, rules):
    loss = build_loss(LossConfig.from_name(variant, fastclip_rules=rules), 8, torch.device("cpu"))
    # InfoNCE has one form; its temperature lr follows the exact rules whatever the flag says
    expected = "exact" if variant in ("openclip", "sdm") else rules
    assert loss.rules is RULES[expected]


def test_occurrence_of_a_repeated_key():
    keys = torch.tensor([3, 1, 3, 2, 1])  # unique, sorted: 1, 2, 3
    assert RULES["official"].occurrence(keys).tolist() == [4, 3, 2]  # the last write wins
    assert RULES["exact"].occurrence(keys).tolist() == [1, 3, 0]  # the first
