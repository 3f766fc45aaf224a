// Brook capture worklet: runs on the audio rendering thread. It turns the microphone's float samples into
// 16 kHz little-endian PCM16 chunks of 100 ms and reports the input level; the page only forwards them.
const TARGET_RATE_HZ = 16000;
const CHUNK_SAMPLES = 1600; // 100 ms at 16 kHz

class BrookCaptureProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = sampleRate / TARGET_RATE_HZ; // input samples per output sample
    this.position = 0; // fractional read position in the current input block
    this.previous = 0;
    this.chunk = new Int16Array(CHUNK_SAMPLES);
    this.filled = 0;
    this.peak = 0;
    this.sumSquares = 0;
    this.levelCount = 0;
  }

  emit(value) {
    const clamped = Math.max(-1, Math.min(1, value));
    this.chunk[this.filled++] = clamped < 0 ? clamped * 0x8000 : clamped * 0x7fff;
    this.sumSquares += clamped * clamped;
    this.levelCount++;
    if (this.filled === CHUNK_SAMPLES) {
      const rms = Math.sqrt(this.sumSquares / this.levelCount);
      this.port.postMessage({ pcm: this.chunk.buffer, rms }, [this.chunk.buffer]);
      this.chunk = new Int16Array(CHUNK_SAMPLES);
      this.filled = 0;
      this.sumSquares = 0;
      this.levelCount = 0;
    }
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true;
    const input = channels[0];
    if (this.step === 1) {
      for (let i = 0; i < input.length; i++) this.emit(input[i]);
      return true;
    }
    // Linear interpolation between neighbouring input samples (the context normally already runs at 16 kHz).
    while (this.position < input.length) {
      const index = Math.floor(this.position);
      const fraction = this.position - index;
      const left = index === 0 ? this.previous : input[index - 1];
      const right = input[index];
      this.emit(left + (right - left) * fraction);
      this.position += this.step;
    }
    this.position -= input.length;
    this.previous = input[input.length - 1];
    return true;
  }
}

registerProcessor("brook-capture", BrookCaptureProcessor);
