"""README's reference block is generated from the code: they must agree."""


from helpers_qlora import REPO


def test_readme_reference_matches_code():
    import importlib.util
    spec = importlib.util.spec_from_file_location("gen_reference", REPO / "scripts" / "gen_reference.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    readme = (REPO / "README.md").read_text()
    assert gen.BEGIN in readme and gen.END in readme
    block = readme[readme.index(gen.BEGIN) + len(gen.BEGIN):readme.index(gen.END)].strip()
    assert block == gen.reference().strip(), "README.md is stale: run python scripts/gen_reference.py --write"


def test_readme_test_command_is_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    assert "./run_tests.sh" in ci and "./run_tests.sh" in readme
