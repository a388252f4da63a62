"""License table, detection from the base's files, acceptance gate and derived names."""

import pytest


def test_table_has_the_required_licenses_and_llama_terms():
    from pipeline.licenses import lookup, render_obligations, table

    assert {"llama3.3", "llama3.1", "apache-2.0", "mit", "gemma", "qwen"} <= set(table())
    llama = lookup("LLAMA3.3")
    assert llama.attribution == "Built with Llama" and llama.name_prefix == "Llama"
    text = render_obligations(llama, "llama3.3", "model.license")
    assert "700 million monthly active users" in text and "acceptable use policy" in text
    assert llama.usage_policy in text and llama.url in text
    assert lookup("tongyi-qianwen").id == "qwen" and lookup("Apache-2") is lookup("apache-2.0")
    assert lookup("gemma").notice.startswith("Gemma is provided under")
    assert lookup("some-other-license") is None


def test_license_is_read_from_the_base_files(tmp_path):
    from pipeline.licenses import resolve

    (tmp_path / "README.md").write_text("---\nlicense: llama3.1\nbase_model: x\n---\n# Model\n")
    lic, name, source = resolve(None, tmp_path)
    assert lic.id == "llama3.1" and source.endswith("README.md")
    (tmp_path / "README.md").write_text("---\nlicense: other\nlicense_name: qwen\n---\n")
    assert resolve(None, tmp_path)[0].id == "qwen"
    (tmp_path / "README.md").unlink()
    (tmp_path / "LICENSE").write_text("LLAMA 3.3 COMMUNITY LICENSE AGREEMENT\nLlama 3.3 Version Release Date: ...")
    assert resolve(None, tmp_path)[0].id == "llama3.3"
    assert resolve("mit", tmp_path)[0].id == "mit"  # the recipe wins over the files
    (tmp_path / "LICENSE").unlink()
    lic, name, source = resolve(None, tmp_path)
    assert lic is None and name == "unknown"


def test_acceptance_gate_and_derived_names():
    from pipeline.licenses import LicenseError, acknowledgment, derived_name, lookup, notice_text, require_acceptance

    llama = lookup("llama3.3")
    with pytest.raises(LicenseError, match="model.license_accepted is false"):
        require_acceptance(False, llama, "llama3.3", "model.license", "recipes/x.yaml")
    require_acceptance(True, llama, "llama3.3", "model.license", "recipes/x.yaml")
    assert derived_name(None, "medical-coding", llama) == "Llama-medical-coding"
    assert derived_name("Llama-coder", "x", llama) == "Llama-coder"
    with pytest.raises(LicenseError, match="must begin with 'Llama'"):
        derived_name("coder", "x", llama)
    assert derived_name(None, "medical-coding", lookup("apache-2.0")) == "medical-coding"
    ack = acknowledgment(llama, "llama3.3", "model.license", "Llama-medical-coding")
    assert ack["attribution"] == "Built with Llama" and ack["obligations"] == list(llama.obligations)
    notice = notice_text(llama, "llama3.3", "meta-llama/Llama-3.3-70B-Instruct", ["LICENSE", "USE_POLICY.md"])
    assert "Built with Llama" in notice and llama.notice in notice and "LICENSE, USE_POLICY.md" in notice


def test_llama3_prefix_counts_spaces_and_hyphens_alike():
    """'Llama 3' (the license's words) is met by the hyphenated name the export derives itself, and only by it."""
    from pipeline.licenses import LicenseError, derived_name, lookup

    llama3 = lookup("llama3")
    assert llama3.name_prefix == "Llama 3"
    derived = derived_name(None, "medcode", llama3)
    assert derived == "Llama-3-medcode"
    assert derived_name(derived, "x", llama3) == "Llama-3-medcode"  # the default, set by hand, is accepted
    assert derived_name("Llama 3 medcode", "x", llama3) == "Llama 3 medcode"
    assert derived_name(None, "Llama 3-medcode", llama3) == "Llama 3-medcode"  # already prefixed: unchanged
    with pytest.raises(LicenseError, match=r"must begin with 'Llama 3'.*use e\.g\. Llama-3-medcode$"):
        derived_name("medcode", "x", llama3)
    with pytest.raises(LicenseError):
        derived_name("Llama-medcode", "x", llama3)  # 'Llama' alone is not 'Llama 3'
    assert derived_name("Llama-coder", "x", lookup("llama3.3")) == "Llama-coder"


def test_shipped_recipes_do_not_accept_licenses_by_default():
    from conftest import ROOT

    from pipeline.recipe import load_recipe

    for path in (ROOT / "recipes").glob("*.yaml"):
        assert load_recipe(path).model.license_accepted is False, path
