import pytest
from helpers import load_settings

from cosyserve.settings import Settings, SettingsError


def test_defaults_match_the_official_server():
    s = load_settings([], environ={})
    assert (s.host, s.port, s.model_dir, s.gpu) == ("0.0.0.0", 50000, "iic/CosyVoice-300M", None)
    assert s.cors_origins == ("*",) and not s.cors_allow_credentials


def test_environment_twins_and_flag_precedence():
    env = {
        "COSYSERVE_PORT": "6000",
        "COSYSERVE_HOST": "127.0.0.1",
        "COSYSERVE_MODEL_DIR": "/models/x",
        "COSYSERVE_GPU": "1",
        "COSYSERVE_MAX_TEXT_LENGTH": "100",
        "COSYSERVE_MAX_UPLOAD_MB": "0.5",
        "COSYSERVE_CORS_ORIGINS": "https://a.example, https://b.example",
        "COSYSERVE_CORS_ALLOW_CREDENTIALS": "true",
    }
    s = load_settings([], environ=env)
    assert (s.port, s.host, s.model_dir, s.gpu, s.max_text_length) == (6000, "127.0.0.1", "/models/x", 1, 100)
    assert s.max_upload_bytes == 512 * 1024
    assert s.cors_origins == ("https://a.example", "https://b.example") and s.cors_allow_credentials
    s = load_settings(["--port", "7000", "--model-dir", "/other", "--gpu", "-1"], environ=env)
    assert (s.port, s.model_dir, s.gpu) == (7000, "/other", -1)


def test_empty_cors_env_disables_cors():
    assert load_settings([], environ={"COSYSERVE_CORS_ORIGINS": ""}).cors_origins == ()


@pytest.mark.parametrize(
    "env",
    [{"COSYSERVE_PORT": "abc"}, {"COSYSERVE_PORT": "70000"}, {"COSYSERVE_CORS_ALLOW_CREDENTIALS": "maybe"}],
)
def test_bad_environment_values_are_reported(env):
    with pytest.raises(SettingsError) as err:
        load_settings([], environ=env)
    assert "COSYSERVE_" in str(err.value) or "port" in str(err.value)


def test_credentials_with_wildcard_origin_are_refused():
    with pytest.raises(SettingsError, match="wildcard"):
        Settings(cors_allow_credentials=True)
    assert Settings(cors_origins=("https://app.example",), cors_allow_credentials=True).cors_allow_credentials


def test_llm_weights_and_text_frontend_flags():
    s = load_settings([], environ={"COSYSERVE_LLM_WEIGHTS": "llm.rl.pt", "COSYSERVE_TEXT_FRONTEND": "none"})
    assert (s.llm_weights, s.text_frontend) == ("llm.rl.pt", "none")
    s = load_settings(["--llm_weights", "llm.pt", "--text_frontend", "wetext"], environ={})
    assert (s.llm_weights, s.text_frontend) == ("llm.pt", "wetext")
    with pytest.raises(SettingsError, match="inside the model directory"):
        Settings(llm_weights="../elsewhere/llm.pt")
    with pytest.raises(SettingsError, match="text frontend"):
        Settings(text_frontend="ttsfrd")
