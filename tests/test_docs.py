"""README's reference block is generated from the code: they must agree."""


from helpers_qlora import REPO


def test_readme_reference_matches_code():
    import importlib.util
    spec = importlib.util.spec_from_file_location("gen_reference", REPO / "scripts" / "gen_reference.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    readme = (REPO / "README.md").read_text()
    for begin, end, make in gen.BLOCKS:
        assert begin in readme and end in readme
        block = readme[readme.index(begin) + len(begin):readme.index(end)].strip()
        assert block == make().strip(), "README.md is stale: run python scripts/gen_reference.py --write"


def test_readme_test_command_is_what_ci_runs():
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    assert "./run_tests.sh" in ci and "./run_tests.sh" in readme
