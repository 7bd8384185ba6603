from vidret_lib.progress import progress, progress_disabled


def test_bars_only_on_a_terminal_and_never_with_vidret_progress_0(monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    monkeypatch.delenv("VIDRET_PROGRESS", raising=False)
    assert not progress_disabled()
    monkeypatch.setenv("VIDRET_PROGRESS", "0")
    assert progress_disabled()
    assert progress(range(3)).disable
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)
    monkeypatch.delenv("VIDRET_PROGRESS")
    assert progress_disabled()
