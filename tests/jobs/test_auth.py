"""Where the Ray token comes from: the variable first, then the file Ray itself keeps."""

from jobs.auth import ray_auth_headers, ray_auth_token


def test_the_token_file_in_home_is_found_without_any_variable(tmp_path):
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert ray_auth_token({"HOME": str(tmp_path)}) == "from-home"


def test_the_token_path_variable_beats_home_and_the_token_variable_beats_both(tmp_path):
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home")
    (tmp_path / "elsewhere").write_text("from-path")
    env = {"HOME": str(tmp_path), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "elsewhere")}
    assert ray_auth_headers(env) == {"Authorization": "Bearer from-path"}
    assert ray_auth_token({**env, "RAY_AUTH_TOKEN": "from-env"}) == "from-env"


def test_no_token_anywhere_means_no_header(tmp_path):
    assert ray_auth_headers({"HOME": str(tmp_path)}) == {}
