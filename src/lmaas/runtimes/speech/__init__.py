"""Speech-to-text runtimes: audio decoding and Whisper on CTranslate2 or transformers."""
