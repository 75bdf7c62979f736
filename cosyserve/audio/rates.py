"""Output sample rates a client may ask for (telephony to studio); every route resamples to them.

Its own module, without numpy or codecs, so that reading the server's settings imports nothing heavy.
"""

OUTPUT_RATES = (8000, 16000, 22050, 24000, 44100, 48000)
