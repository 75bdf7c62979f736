// cosyserve web page: plain browser JavaScript, no build step.
// It talks to the official /inference_* routes (multipart forms) and the voice library routes; every call
// carries the API key typed into the page (kept in localStorage) as "Authorization: Bearer <key>".
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORAGE = "cosyserve.apiKey";
  const API_BASE = new URL("..", location.href); // the page lives at <server>/web/
  const MAX_RECORD_SECONDS = 30;

  // What each mode needs. voice: "library" (a speaker id only) or "any" (a library voice or a recording).
  const MODES = {
    sft: { label: "Built-in speaker (sft)", voice: "library", text: true,
      help: "Speaks with a built-in speaker or a stored voice." },
    zero_shot: { label: "Clone a voice (zero-shot)", voice: "any", text: true, transcript: true,
      help: "Clones a recording; needs its transcript (a stored voice keeps it)." },
    cross_lingual: { label: "Clone, any language (cross-lingual)", voice: "any", text: true,
      help: "Clones a recording without its transcript; the text may be in another language." },
    instruct: { label: "Speaker + instruction (instruct)", voice: "library", text: true, instruct: true,
      help: "A built-in speaker steered by an instruction (CosyVoice-300M-Instruct)." },
    instruct2: { label: "Voice + instruction (instruct2)", voice: "any", text: true, instruct: true,
      help: "A cloned voice steered by an instruction: style, emotion, dialect." },
    vc: { label: "Voice conversion (vc)", voice: "any", source: true,
      help: "Re-speaks a source recording in the chosen voice." },
  };

  const state = { health: null, voices: [], recording: null, abort: null, ctx: null, sources: [] };
  // Counters a test (or a curious user) can read: what arrived and what the speakers played.
  const player = (window.cosyPlayer = {
    requests: 0, chunks: 0, bytes: 0, samples: 0, sampleRate: 0, sourcesEnded: 0, playedSeconds: 0,
    done: false, error: null, lastMode: null, lastFormat: null,
  });

  // -- HTTP ------------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(message, status) { super(message); this.status = status; }
  }

  function apiKey() { return localStorage.getItem(KEY_STORAGE) || ""; }

  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    const key = apiKey();
    if (key) headers.set("Authorization", `Bearer ${key}`);
    const response = await fetch(new URL(path, API_BASE), { ...options, headers });
    if (!response.ok) throw await errorOf(response);
    return response;
  }

  async function errorOf(response) {
    let message = `HTTP ${response.status}`;
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) message = body.error.message;
    } catch (_) { /* not JSON */ }
    if (response.status === 401) {
      message = apiKey() ? "The API key was refused: check it above." : "This server needs an API key: enter it above.";
    }
    return new ApiError(message, response.status);
  }

  function showError(error) {
    const box = $("error");
    if (!error) { box.hidden = true; box.textContent = ""; return; }
    box.textContent = error.message || String(error);
    box.hidden = false;
    if (error.status === 401) $("api-key").focus();
  }

  // -- model and voices ------------------------------------------------------------------------------

  async function loadHealth() {
    const status = $("model-status");
    try {
      const response = await fetch(new URL("health", API_BASE));
      const body = await response.json();
      if (response.status === 503) {
        status.textContent = body.status === "error" ? `Model failed to load: ${body.error}` : "Loading the model…";
        status.classList.toggle("bad", body.status === "error");
        if (body.status !== "error") setTimeout(loadHealth, 2000);
        return;
      }
      state.health = body;
      status.classList.remove("bad");
      status.innerHTML = "";
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.textContent = body.model || body.family;
      status.append(badge, ` ${body.family} · ${(body.sample_rate / 1000).toFixed(body.sample_rate % 1000 ? 2 : 0)} kHz`);
      fillModes(body.modes);
      await loadVoices();
    } catch (error) {
      status.textContent = `Cannot reach the server: ${error.message}`;
      status.classList.add("bad");
      setTimeout(loadHealth, 3000);
    }
  }

  function fillModes(modes) {
    const select = $("mode");
    const current = select.value;
    select.innerHTML = "";
    for (const [mode, spec] of Object.entries(MODES)) {
      if (!modes.includes(mode)) continue;
      select.append(new Option(spec.label, mode));
    }
    if ([...select.options].some((o) => o.value === current)) select.value = current;
    updateForm();
  }

  async function loadVoices() {
    try {
      const body = await (await api("v1/audio/voices")).json();
      state.voices = body.voices.filter((v) => v.kind !== "alias");
      showError(null);
    } catch (error) {
      state.voices = [];
      showError(error);
    }
    renderVoices();
  }

  function renderVoices(selected) {
    const select = $("voice");
    const keep = selected || select.value;
    select.innerHTML = "";
    const builtin = state.voices.filter((v) => v.builtin);
    const stored = state.voices.filter((v) => !v.builtin);
    for (const [label, list] of [["Stored voices", stored], ["Built-in speakers", builtin]]) {
      if (!list.length) continue;
      const group = document.createElement("optgroup");
      group.label = label;
      for (const voice of list) {
        const option = new Option(voice.usable === false ? `${voice.id} (other model)` : voice.id, voice.id);
        option.disabled = voice.usable === false;
        group.append(option);
      }
      select.append(group);
    }
    if ([...select.options].some((o) => o.value === keep)) select.value = keep;

    const list = $("voice-list");
    list.innerHTML = "";
    for (const voice of stored) list.append(voiceRow(voice));
    if (!stored.length) {
      const empty = document.createElement("li");
      empty.className = "empty";
      empty.textContent = "No stored voices yet.";
      list.append(empty);
    }
    const chips = $("speaker-list");
    chips.innerHTML = "";
    for (const voice of builtin) {
      const chip = document.createElement("li");
      chip.textContent = voice.id;
      chips.append(chip);
    }
  }

  function voiceRow(voice) {
    const row = document.createElement("li");
    row.dataset.voice = voice.id;
    const meta = document.createElement("div");
    meta.className = "meta";
    const name = document.createElement("div");
    name.className = "name";
    name.textContent = voice.id;
    if (voice.usable === false) {
      const tag = document.createElement("span");
      tag.className = "tag";
      tag.textContent = voice.model_family || "other model";
      name.append(tag);
    }
    const sub = document.createElement("div");
    sub.className = "sub";
    const seconds = voice.duration ? `${voice.duration.toFixed(1)} s` : "";
    sub.textContent = [seconds, voice.ref_text ? `“${voice.ref_text}”` : "no transcript"].filter(Boolean).join(" · ");
    sub.title = voice.ref_text || "";
    meta.append(name, sub);

    const use = document.createElement("button");
    use.type = "button";
    use.className = "secondary small";
    use.textContent = "Use";
    use.setAttribute("aria-label", `Use voice ${voice.id}`);
    use.disabled = voice.usable === false;
    use.addEventListener("click", () => {
      $("src-library").checked = true;
      updateForm();
      $("voice").value = voice.id;
      $("voice").focus();
    });

    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "secondary small danger";
    remove.textContent = "Delete";
    remove.setAttribute("aria-label", `Delete voice ${voice.id}`);
    let armed = null;
    remove.addEventListener("click", async () => {
      if (!armed) { // two clicks, so one slip does not lose a voice
        remove.textContent = "Really delete?";
        armed = setTimeout(() => { armed = null; remove.textContent = "Delete"; }, 4000);
        return;
      }
      clearTimeout(armed);
      remove.disabled = true;
      try {
        await api(`v1/audio/voices/${encodeURIComponent(voice.id)}`, { method: "DELETE" });
        await loadVoices();
      } catch (error) {
        showError(error);
        remove.disabled = false;
      }
    });
    row.append(meta, use, remove);
    return row;
  }

  // -- the form --------------------------------------------------------------------------------------

  function updateForm() {
    const spec = MODES[$("mode").value] || MODES.sft;
    const libraryOnly = spec.voice === "library";
    $("src-recording").disabled = libraryOnly;
    if (libraryOnly) $("src-library").checked = true;
    const recording = $("src-recording").checked;
    $("library-panel").hidden = recording;
    $("recording-panel").hidden = !recording;
    $("text-field").hidden = !spec.text;
    $("instruct-field").hidden = !spec.instruct;
    $("source-field").hidden = !spec.source;
    $("mode-help").textContent = spec.help;
  }

  async function speak(event) {
    event.preventDefault();
    showError(null);
    stopPlayback();
    const mode = $("mode").value;
    const spec = MODES[mode];
    const format = $("format").value;
    let form;
    try {
      form = buildForm(mode, spec, format);
    } catch (error) {
      player.error = error.message;
      showError(error);
      return;
    }
    if (!state.ctx) state.ctx = new AudioContext();
    state.ctx.resume().catch(() => {});
    const abort = (state.abort = new AbortController());
    setBusy(true);
    Object.assign(player, { chunks: 0, bytes: 0, samples: 0, done: false, error: null, lastMode: mode, lastFormat: format });
    player.requests += 1;
    resetStats();
    const started = performance.now();
    try {
      const response = await api(`inference_${mode}`, { method: "POST", body: form, signal: abort.signal });
      if (format === "pcm") await playPcm(response, started);
      else await playFile(response, format, started);
      player.done = true;
    } catch (error) {
      if (error.name !== "AbortError") { player.error = error.message; showError(error); }
    } finally {
      $("stat-total").textContent = `${((performance.now() - started) / 1000).toFixed(2)} s`;
      setBusy(false);
      state.abort = null;
    }
  }

  function buildForm(mode, spec, format) {
    const form = new FormData();
    if (spec.text) {
      const text = $("text").value.trim();
      if (!text) throw new Error("Enter some text to speak.");
      form.append("tts_text", text);
    }
    if (spec.instruct) {
      const instruct = $("instruct").value.trim();
      if (!instruct) throw new Error("Enter an instruction.");
      form.append("instruct_text", instruct);
    }
    if ($("src-recording").checked && spec.voice === "any") {
      if (!state.recording) throw new Error("Upload or record a voice first.");
      form.append("prompt_wav", state.recording.blob, state.recording.name);
      if (spec.transcript) {
        const transcript = $("prompt-text").value.trim();
        if (!transcript) throw new Error("Zero-shot cloning needs the transcript of the recording.");
        form.append("prompt_text", transcript);
      }
    } else {
      if (!$("voice").value) throw new Error("Choose a voice.");
      form.append("spk_id", $("voice").value);
    }
    if (spec.source) {
      const file = $("source-file").files[0];
      if (!file) throw new Error("Choose the recording to convert.");
      form.append("source_wav", file, file.name);
    }
    form.append("format", format);
    form.append("stream", $("stream").checked ? "true" : "false");
    form.append("speed", $("speed").value);
    if ($("seed").value !== "") form.append("seed", $("seed").value);
    return form;
  }

  // -- text preview (POST /v1/text/preview: the segments exactly as they will be synthesised) ----------

  async function previewText() {
    const list = $("preview");
    const summary = $("preview-summary");
    const text = $("text").value.trim();
    list.replaceChildren();
    list.hidden = true;
    window.cosyPreview = null;
    if (!text) { summary.textContent = "Enter some text to preview."; return; }
    const spec = MODES[$("mode").value] || MODES.sft;
    const body = { input: text, speed: Number($("speed").value) };
    if ($("voice").value) body.voice = $("voice").value;
    if (spec.instruct && $("instruct").value.trim()) body.instructions = $("instruct").value.trim();
    summary.textContent = "Previewing…";
    try {
      const response = await api("v1/text/preview", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      });
      const result = await response.json();
      for (const segment of result.segments) list.append(previewRow(segment));
      const count = result.segments.length;
      let line = `${result.mode} · ${count} segment${count === 1 ? "" : "s"} · ${result.text_tokens} text tokens`;
      if (result.ssml_ignored_tags.length) line += ` · ignored SSML: ${result.ssml_ignored_tags.join(", ")}`;
      summary.textContent = line;
      list.hidden = false;
      window.cosyPreview = result;
    } catch (error) {
      summary.textContent = error.message;
    }
  }

  function previewRow(segment) {
    const item = document.createElement("li");
    const words = document.createElement("span");
    words.className = "preview-text";
    words.textContent = segment.text; // the model's own text: never parsed as HTML
    const facts = document.createElement("span");
    facts.className = "hint";
    const parts = [`${segment.text_tokens} tokens`];
    if (segment.speed !== 1) parts.push(`speed ${segment.speed}×`);
    if (segment.break_before_ms) parts.push(`pause ${segment.break_before_ms} ms before`);
    if (segment.break_after_ms) parts.push(`pause ${segment.break_after_ms} ms after`);
    facts.textContent = parts.join(" · ");
    item.append(words, facts);
    return item;
  }

  function setBusy(busy) {
    $("speak").disabled = busy;
    $("speak").textContent = busy ? "Speaking…" : "Speak";
    $("stop").disabled = !busy;
  }

  function resetStats() {
    for (const id of ["stat-first", "stat-duration", "stat-total", "stat-bytes"]) $(id).textContent = "–";
    $("download").hidden = true;
  }

  function firstAudio(started) {
    if ($("stat-first").textContent === "–") {
      $("stat-first").textContent = `${Math.round(performance.now() - started)} ms`;
    }
  }

  // -- playback --------------------------------------------------------------------------------------

  // Raw 16-bit PCM, played through Web Audio as the chunks arrive; kept whole for replay and download.
  async function playPcm(response, started) {
    const rate = Number(response.headers.get("X-Sample-Rate")) || (state.health && state.health.sample_rate) || 24000;
    player.sampleRate = rate;
    const ctx = state.ctx;
    const reader = response.body.getReader();
    const parts = [];
    let carry = new Uint8Array(0);
    let next = 0;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      player.bytes += value.length;
      const bytes = new Uint8Array(carry.length + value.length);
      bytes.set(carry);
      bytes.set(value, carry.length);
      const usable = bytes.length - (bytes.length % 2);
      carry = bytes.slice(usable);
      if (!usable) continue;
      const ints = new Int16Array(bytes.buffer.slice(0, usable));
      const floats = Float32Array.from(ints, (s) => s / 32768);
      parts.push(floats);
      player.chunks += 1;
      player.samples += floats.length;
      firstAudio(started);
      const buffer = ctx.createBuffer(1, floats.length, rate);
      buffer.copyToChannel(floats, 0);
      const source = ctx.createBufferSource();
      source.buffer = buffer;
      source.connect(ctx.destination);
      const at = Math.max(next, ctx.currentTime + 0.05);
      source.onended = () => { player.sourcesEnded += 1; player.playedSeconds += buffer.duration; };
      source.start(at);
      state.sources.push(source);
      next = at + buffer.duration;
      $("stat-bytes").textContent = kb(player.bytes);
      $("stat-duration").textContent = `${(player.samples / rate).toFixed(2)} s`;
    }
    if (!player.samples) throw new Error("The server sent no audio.");
    const wav = wavBlob(concat(parts), rate);
    setPlayerSource(wav, "wav");
  }

  // A whole file (wav, mp3, opus, flac) played by the audio element once it has arrived.
  async function playFile(response, format, started) {
    const blob = await response.blob();
    firstAudio(started);
    player.bytes = blob.size;
    player.chunks = 1;
    $("stat-bytes").textContent = kb(blob.size);
    const audio = setPlayerSource(blob, format);
    await new Promise((resolve) => {
      if (audio.readyState >= 1) resolve();
      else audio.addEventListener("loadedmetadata", resolve, { once: true });
      audio.addEventListener("error", resolve, { once: true });
    });
    if (Number.isFinite(audio.duration)) $("stat-duration").textContent = `${audio.duration.toFixed(2)} s`;
    try { await audio.play(); } catch (error) { showError(new Error(`The browser cannot play ${format}: ${error.message}`)); }
  }

  function setPlayerSource(blob, extension) {
    const audio = $("player");
    if (audio.src) URL.revokeObjectURL(audio.src);
    const url = URL.createObjectURL(blob);
    audio.src = url;
    const link = $("download");
    link.href = url;
    link.download = `speech.${extension}`;
    link.textContent = `Download speech.${extension} (${kb(blob.size)})`;
    link.hidden = false;
    return audio;
  }

  function stopPlayback() {
    if (state.abort) state.abort.abort();
    for (const source of state.sources) { try { source.stop(); } catch (_) { /* not started */ } }
    state.sources = [];
    $("player").pause();
  }

  // -- recordings ------------------------------------------------------------------------------------

  function useRecording(blob, name) {
    state.recording = { blob, name };
    const preview = $("prompt-preview");
    if (preview.src) URL.revokeObjectURL(preview.src);
    preview.src = URL.createObjectURL(blob);
    preview.hidden = false;
  }

  let recorder = null;
  async function toggleRecording() {
    const button = $("record");
    const status = $("record-status");
    if (recorder) { recorder.stop(); return; }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (error) {
      showError(new Error(`No microphone: ${error.message}`));
      return;
    }
    const chunks = [];
    recorder = new MediaRecorder(stream);
    const began = performance.now();
    const tick = setInterval(() => {
      const seconds = (performance.now() - began) / 1000;
      status.textContent = `Recording… ${seconds.toFixed(1)} s (click Stop when done)`;
      if (seconds >= MAX_RECORD_SECONDS) recorder.stop();
    }, 200);
    recorder.addEventListener("dataavailable", (e) => { if (e.data.size) chunks.push(e.data); });
    recorder.addEventListener("stop", async () => {
      clearInterval(tick);
      stream.getTracks().forEach((t) => t.stop());
      recorder = null;
      button.textContent = "● Record";
      button.setAttribute("aria-pressed", "false");
      try {
        // Browsers record webm/ogg; the server is sent plain WAV, which every decoder reads.
        const wav = await toWav(new Blob(chunks, { type: chunks[0] ? chunks[0].type : "audio/webm" }));
        useRecording(wav, "recording.wav");
        status.textContent = `Recorded ${((performance.now() - began) / 1000).toFixed(1)} s`;
      } catch (error) {
        status.textContent = "";
        showError(new Error(`The recording could not be decoded: ${error.message}`));
      }
    });
    recorder.start(250);
    button.textContent = "■ Stop";
    button.setAttribute("aria-pressed", "true");
  }

  async function toWav(blob) {
    const ctx = state.ctx || (state.ctx = new AudioContext());
    const decoded = await ctx.decodeAudioData(await blob.arrayBuffer());
    const mono = new Float32Array(decoded.length);
    for (let c = 0; c < decoded.numberOfChannels; c++) {
      const channel = decoded.getChannelData(c);
      for (let i = 0; i < mono.length; i++) mono[i] += channel[i] / decoded.numberOfChannels;
    }
    return wavBlob(mono, decoded.sampleRate);
  }

  async function saveVoice() {
    showError(null);
    const name = $("voice-name").value.trim();
    try {
      if (!state.recording) throw new Error("Upload or record a voice first.");
      if (!name) throw new Error("Give the voice a name.");
      const form = new FormData();
      form.append("name", name);
      form.append("audio_sample", state.recording.blob, state.recording.name);
      const transcript = $("prompt-text").value.trim();
      if (transcript) form.append("ref_text", transcript);
      $("save-voice").disabled = true;
      await api("v1/audio/voices", { method: "POST", body: form });
      $("voice-name").value = "";
      await loadVoices();
      renderVoices(name);
      $("record-status").textContent = `Saved “${name}” to the library.`;
    } catch (error) {
      showError(error);
    } finally {
      $("save-voice").disabled = false;
    }
  }

  // -- audio helpers ---------------------------------------------------------------------------------

  function concat(parts) {
    const out = new Float32Array(parts.reduce((n, p) => n + p.length, 0));
    let offset = 0;
    for (const part of parts) { out.set(part, offset); offset += part.length; }
    return out;
  }

  function wavBlob(samples, rate) {
    const view = new DataView(new ArrayBuffer(44 + samples.length * 2));
    const text = (offset, s) => { for (let i = 0; i < s.length; i++) view.setUint8(offset + i, s.charCodeAt(i)); };
    text(0, "RIFF"); view.setUint32(4, 36 + samples.length * 2, true); text(8, "WAVE");
    text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
    view.setUint32(24, rate, true); view.setUint32(28, rate * 2, true); view.setUint16(32, 2, true);
    view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, samples.length * 2, true);
    for (let i = 0; i < samples.length; i++) {
      const s = Math.max(-1, Math.min(1, samples[i]));
      view.setInt16(44 + i * 2, s < 0 ? s * 32768 : s * 32767, true);
    }
    return new Blob([view], { type: "audio/wav" });
  }

  function kb(bytes) { return bytes < 1024 ? `${bytes} B` : `${(bytes / 1024).toFixed(1)} KB`; }

  // -- long-form jobs --------------------------------------------------------------------------------

  let jobTimer = null;

  function jobItem(job) {
    const li = document.createElement("li");
    li.dataset.job = job.id;
    li.dataset.status = job.status;
    const meta = document.createElement("div");
    meta.className = "meta";
    const p = job.progress;
    const bar = document.createElement("progress");
    bar.max = 100;
    bar.value = p.percent;
    bar.setAttribute("aria-label", `Progress of ${job.id}`);
    const sub = document.createElement("div");
    sub.className = "sub";
    const eta = p.eta_seconds != null && job.status === "running" ? ` · ${Math.round(p.eta_seconds)} s left` : "";
    const error = job.error ? ` · ${job.error.message}` : "";
    sub.textContent = `${job.status} · ${p.percent.toFixed(1)} % · ${p.segments_done}/${p.segments_total} segments · ` +
      `${p.audio_seconds.toFixed(1)} s audio · ${job.characters} characters${eta}${error}`;
    meta.append(bar, sub);
    li.append(meta);
    const actions = [];
    if (p.segments_done > 0) actions.push(["Download", () => downloadJob(job, "audio", `${job.id}.${job.response_format}`)]);
    if (p.segments_done > 0) actions.push(["SRT", () => downloadJob(job, "captions.srt", `${job.id}.srt`)]);
    if (job.status === "queued" || job.status === "running") {
      actions.push(["Cancel", () => api(`v1/audio/jobs/${job.id}/cancel`, { method: "POST" }).then(loadJobs, showError)]);
    }
    actions.push(["Delete", () => api(`v1/audio/jobs/${job.id}`, { method: "DELETE" }).then(loadJobs, showError)]);
    for (const [label, action] of actions) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "secondary small";
      button.textContent = label;
      button.addEventListener("click", action);
      li.append(button);
    }
    return li;
  }

  async function downloadJob(job, what, name) {
    try {
      const blob = await (await api(`v1/audio/jobs/${job.id}/${what}`)).blob();
      const link = document.createElement("a");
      link.href = URL.createObjectURL(blob);
      link.download = name;
      link.click();
    } catch (error) { showError(error); }
  }

  async function loadJobs() {
    clearTimeout(jobTimer);
    const list = $("job-list");
    let jobs = [];
    try {
      jobs = (await (await api("v1/audio/jobs")).json()).data;
    } catch (error) {
      list.replaceChildren();
      return;
    }
    if (!jobs.length) {
      const li = document.createElement("li");
      li.className = "empty";
      li.textContent = "No jobs yet.";
      list.replaceChildren(li);
    } else {
      list.replaceChildren(...jobs.map(jobItem));
    }
    if (jobs.some((j) => j.status === "queued" || j.status === "running")) jobTimer = setTimeout(loadJobs, 1000);
  }

  async function submitJob() {
    showError(null);
    const body = { input: $("text").value, response_format: $("format").value === "pcm" ? "wav" : $("format").value };
    if ($("voice").value) body.voice = $("voice").value;
    if ($("seed").value) body.seed = Number($("seed").value);
    body.speed = Number($("speed").value);
    try {
      await api("v1/audio/jobs", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      });
    } catch (error) { showError(error); }
    loadJobs();
  }

  // -- wiring ----------------------------------------------------------------------------------------

  $("api-key").value = apiKey();
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key); else localStorage.removeItem(KEY_STORAGE);
    loadVoices();
    loadJobs();
  });
  $("mode").addEventListener("change", updateForm);
  for (const radio of document.querySelectorAll('input[name="voice-source"]')) radio.addEventListener("change", updateForm);
  $("speed").addEventListener("input", () => { $("speed-value").textContent = `${Number($("speed").value).toFixed(1)}×`; });
  $("prompt-file").addEventListener("change", () => {
    const file = $("prompt-file").files[0];
    if (file) { useRecording(file, file.name); $("record-status").textContent = `Using ${file.name}`; }
  });
  $("record").addEventListener("click", toggleRecording);
  $("save-voice").addEventListener("click", saveVoice);
  $("refresh-voices").addEventListener("click", loadVoices);
  $("refresh-jobs").addEventListener("click", loadJobs);
  $("submit-job").addEventListener("click", submitJob);
  $("synth-form").addEventListener("submit", speak);
  $("preview-text").addEventListener("click", previewText);
  $("stop").addEventListener("click", stopPlayback);
  $("player").addEventListener("play", () => { player.elementPlays = (player.elementPlays || 0) + 1; });
  updateForm();
  loadHealth();
  loadJobs();
})();
