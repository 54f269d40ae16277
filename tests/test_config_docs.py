"""docs/configs.md's "Every key" part is generated from the config models: it must be current."""

from __future__ import annotations

from pipeline.config import Config
from pipeline.config_docs import BEGIN, COMMAND, END, PAGE, render, replace_generated_part
from stages.common.settings import section_type


def test_the_page_says_what_the_models_say():
    text = PAGE.read_text(encoding="utf-8")
    assert BEGIN in text and END in text, f"{PAGE} lost its generated part's markers: run `{COMMAND}`"
    assert replace_generated_part(text, render()) == text, f"{PAGE} is out of date: run `{COMMAND}`"


def test_every_key_has_a_description():
    def missing(model, prefix):
        for name, field in model.model_fields.items():
            nested = section_type(field.annotation)
            if nested is not None:
                yield from missing(nested, f"{prefix}{name}.")
            if not field.description:
                yield f"{prefix}{name}"

    sections = {name: section_type(field.annotation) for name, field in Config.model_fields.items()}
    assert [key for name, model in sections.items() for key in missing(model, f"{name}.")] == []
    assert all(model.__doc__ for model in sections.values())


def test_the_generated_part_lists_types_bounds_defaults_and_the_key_notes():
    text = render()
    assert "- `epochs` (integer >= 1; default `5`): Training epochs." in text
    assert "- `scales` (list of numbers, each > 0, not empty; default `[1.0, 0.5, 1.5, 2.0]`)" in text
    assert "- `gt_prob` (number in (0, 0.99]; default `0.7`)" in text
    assert "Read by `method: pylon` only" in text and "In the `pseudo` stage's key" in text


def test_the_first_generation_replaces_the_hand_written_list():
    page = "# Configs\n\n## Every key\n\n- `data`: old text\n\n## After\n\nkept\n"
    updated = replace_generated_part(page, f"{BEGIN}\nnew\n{END}")
    assert updated == f"# Configs\n\n## Every key\n\n{BEGIN}\nnew\n{END}\n\n## After\n\nkept\n"
    assert replace_generated_part(updated, f"{BEGIN}\nnewer\n{END}") == updated.replace("new\n", "newer\n")
