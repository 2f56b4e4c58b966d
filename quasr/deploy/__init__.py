"""Deployment formats: files the runtimes people deploy Whisper with load (whisper.cpp, CTranslate2)."""
