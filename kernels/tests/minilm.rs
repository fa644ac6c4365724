//! The `embedding` model on all-MiniLM-L6-v2 against the reference embeddings that
//! sentence-transformers computed (`../shared/testdata/minilm_reference.json`): every sentence
//! alone, all together, and mixed into batches with inputs of very different lengths, so
//! padding is shown not to change any result. Also the model's input checks, its token
//! counts, and the pooling function on hand-computed values.
//!
//! The model comes from `scripts/fetch-models` (CI runs it). Where it is missing these tests
//! fail and say so; they do not pass silently.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use candle_core::Tensor;
use quiver_kernels::text::{self, pool};
use quiver_kernels::{
    DataType, Device, Engine, HostTensor, InputError, LoadError, Model, ModelSpec, Pooling,
    Precision, TensorData, TextEmbedding, load,
};

const MODEL_NAME: &str = "all-MiniLM-L6-v2";
const MIN_COSINE: f64 = 0.9999;
const MAX_ABS_DIFF: f64 = 1e-4;
/// The bound of `precision = "int8"` (dynamic quantization), against the reference and fp32.
const MIN_COSINE_INT8: f64 = 0.995;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `$QUIVER_MODELS_DIR/all-MiniLM-L6-v2` or `$QUIVER_MODELS_DIR` itself when it is the model
/// directory; else `<workspace>/models/all-MiniLM-L6-v2`. Panics, naming the fix, when the
/// model is not there.
fn model_dir() -> PathBuf {
    let dir = match std::env::var_os("QUIVER_MODELS_DIR") {
        Some(root) => {
            let root = PathBuf::from(root);
            let nested = root.join(MODEL_NAME);
            if nested.join("config.json").is_file() {
                nested
            } else {
                root
            }
        }
        None => workspace().join("models").join(MODEL_NAME),
    };
    assert!(
        dir.join("model.safetensors").is_file() && dir.join("tokenizer.json").is_file(),
        "{MODEL_NAME} is not in {}: run scripts/fetch-models (or set QUIVER_MODELS_DIR)",
        dir.display()
    );
    dir
}

struct Reference {
    sentences: Vec<String>,
    embeddings: Vec<Vec<f64>>,
}

/// `$QUIVER_TESTDATA` (the file, or a directory holding `minilm_reference.json`), else
/// `<workspace>/../shared/testdata/minilm_reference.json`.
fn reference() -> &'static Reference {
    static REF: OnceLock<Reference> = OnceLock::new();
    REF.get_or_init(|| {
        let path = match std::env::var_os("QUIVER_TESTDATA") {
            Some(p) if Path::new(&p).is_dir() => Path::new(&p).join("minilm_reference.json"),
            Some(p) => PathBuf::from(p),
            None => workspace().join("../shared/testdata/minilm_reference.json"),
        };
        let bytes = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "reference embeddings {}: {e} (set QUIVER_TESTDATA)",
                path.display()
            )
        });
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let sentences: Vec<String> = json["sentences"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect();
        let embeddings: Vec<Vec<f64>> = json["embeddings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                e.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect()
            })
            .collect();
        assert_eq!(sentences.len(), embeddings.len());
        assert!(!sentences.is_empty());
        Reference {
            sentences,
            embeddings,
        }
    })
}

/// The model on the CPU device, loaded once per engine: candle-transformers' BERT, or
/// Quiver's CPU kernels (the default).
fn model_on(engine: Engine) -> Arc<dyn Model> {
    static CANDLE: OnceLock<Arc<dyn Model>> = OnceLock::new();
    static KERNELS: OnceLock<Arc<dyn Model>> = OnceLock::new();
    let (cell, cpu_kernels) = match engine {
        Engine::Candle => (&CANDLE, false),
        _ => (&KERNELS, true),
    };
    cell.get_or_init(|| {
        let spec = ModelSpec::TextEmbedding {
            dir: model_dir(),
            cpu_kernels,
            precision: Precision::Fp32,
        };
        load(&spec, &Device::Cpu).unwrap()
    })
    .clone()
}

/// The model as the gateway loads it by default on the CPU: on Quiver's kernels.
fn model() -> Arc<dyn Model> {
    model_on(Engine::CpuKernels)
}

fn texts(texts: &[&str]) -> HostTensor {
    let data = TensorData::Bytes(texts.iter().map(|t| t.as_bytes().to_vec()).collect());
    HostTensor::new(text::INPUT, vec![texts.len()], data).unwrap()
}

/// Rows of `[n, dim]` FP32 output.
fn rows(out: &HostTensor) -> Vec<Vec<f32>> {
    assert_eq!(out.name, text::OUTPUT);
    let TensorData::F32(v) = &out.data else {
        panic!("embedding is not FP32: {:?}", out.datatype());
    };
    let [n, dim] = out.shape[..] else {
        panic!("embedding has shape {:?}", out.shape);
    };
    assert_eq!(v.len(), n * dim);
    v.chunks_exact(dim).map(<[f32]>::to_vec).collect()
}

/// Asserts both bounds for `got` against reference sentence `i`; returns the cosine and the
/// max abs difference.
fn check(i: usize, got: &[f32], context: &str) -> (f64, f64) {
    let want = &reference().embeddings[i];
    assert_eq!(got.len(), want.len(), "{context}: sentence {i} width");
    let dot: f64 = got.iter().zip(want).map(|(&a, &b)| f64::from(a) * b).sum();
    let na: f64 = got
        .iter()
        .map(|&a| f64::from(a).powi(2))
        .sum::<f64>()
        .sqrt();
    let nb: f64 = want.iter().map(|b| b * b).sum::<f64>().sqrt();
    let cosine = dot / (na * nb);
    let max_diff = got
        .iter()
        .zip(want)
        .map(|(&a, &b)| (f64::from(a) - b).abs())
        .fold(0.0, f64::max);
    assert!(
        cosine >= MIN_COSINE && max_diff <= MAX_ABS_DIFF,
        "{context}: sentence {i} ({:?}): cosine {cosine:.7}, max abs diff {max_diff:.2e}",
        reference().sentences[i]
    );
    (cosine, max_diff)
}

/// A text of about `words` words of ordinary vocabulary.
fn long_text(words: usize) -> String {
    let base = [
        "edge",
        "gateways",
        "batch",
        "requests",
        "for",
        "the",
        "accelerator",
    ];
    (0..words)
        .map(|i| base[i % base.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn each_sentence_alone_matches_the_reference_on_candle() {
    each_sentence_alone_matches_the_reference(Engine::Candle);
}

#[test]
fn each_sentence_alone_matches_the_reference_on_cpu_kernels() {
    each_sentence_alone_matches_the_reference(Engine::CpuKernels);
}

fn each_sentence_alone_matches_the_reference(engine: Engine) {
    let m = model_on(engine);
    let (mut worst_cosine, mut worst_diff) = (1.0f64, 0.0f64);
    for (i, s) in reference().sentences.iter().enumerate() {
        let p = m.prepare(vec![texts(&[s])]).unwrap();
        let out = m.forward(&[p]).unwrap();
        assert_eq!(out.len(), 1);
        let got = rows(&out[0][0]);
        assert_eq!(got.len(), 1);
        let (cosine, diff) = check(i, &got[0], &format!("{engine:?}, alone"));
        worst_cosine = worst_cosine.min(cosine);
        worst_diff = worst_diff.max(diff);
    }
    eprintln!(
        "{engine:?} alone: worst cosine {worst_cosine:.8}, worst max abs diff {worst_diff:.2e}"
    );
}

#[test]
fn all_sentences_in_one_request_match_the_reference_on_candle() {
    all_sentences_in_one_request_match_the_reference(Engine::Candle);
}

#[test]
fn all_sentences_in_one_request_match_the_reference_on_cpu_kernels() {
    all_sentences_in_one_request_match_the_reference(Engine::CpuKernels);
}

fn all_sentences_in_one_request_match_the_reference(engine: Engine) {
    let m = model_on(engine);
    let all: Vec<&str> = reference().sentences.iter().map(String::as_str).collect();
    let p = m.prepare(vec![texts(&all)]).unwrap();
    assert_eq!(p.rows as usize, all.len());
    let out = m.forward(&[p]).unwrap();
    let got = rows(&out[0][0]);
    assert_eq!(got.len(), all.len());
    for (i, e) in got.iter().enumerate() {
        check(i, e, &format!("{engine:?}, one request of all sentences"));
    }
}

#[test]
fn padding_in_a_mixed_batch_changes_no_result_on_candle() {
    padding_in_a_mixed_batch_changes_no_result(Engine::Candle);
}

#[test]
fn padding_in_a_mixed_batch_changes_no_result_on_cpu_kernels() {
    padding_in_a_mixed_batch_changes_no_result(Engine::CpuKernels);
}

fn padding_in_a_mixed_batch_changes_no_result(engine: Engine) {
    let m = model_on(engine);
    let refs = &reference().sentences;
    // Requests in one forward: a text past max_seq_length (truncated to 256 tokens, so every
    // reference sentence is padded by hundreds of tokens), the reference sentences in
    // reverse order across requests of one and two rows, and `[n, 1]` shaped input.
    let long = long_text(400);
    let mut requests = vec![m.prepare(vec![texts(&[&long])]).unwrap()];
    let mut expected: Vec<Option<usize>> = vec![None];
    let order: Vec<usize> = (0..refs.len()).rev().collect();
    for chunk in order.chunks(2) {
        let batch: Vec<&str> = chunk.iter().map(|&i| refs[i].as_str()).collect();
        let mut t = texts(&batch);
        if chunk.len() == 2 {
            t.shape = vec![2, 1];
        }
        requests.push(m.prepare(vec![t]).unwrap());
        expected.extend(chunk.iter().map(|&i| Some(i)));
    }
    requests.push(m.prepare(vec![texts(&["hi", &long_text(30)])]).unwrap());
    expected.extend([None, None]);

    let out = m.forward(&requests).unwrap();
    assert_eq!(out.len(), requests.len());
    let got: Vec<Vec<f32>> = out.iter().flat_map(|o| rows(&o[0])).collect();
    assert_eq!(got.len(), expected.len());
    let (mut worst_cosine, mut worst_diff) = (1.0f64, 0.0f64);
    for (e, want) in got.iter().zip(&expected) {
        if let Some(i) = want {
            let (cosine, diff) = check(
                *i,
                e,
                &format!("{engine:?}, mixed batch with a 256-token row"),
            );
            worst_cosine = worst_cosine.min(cosine);
            worst_diff = worst_diff.max(diff);
        }
    }
    eprintln!(
        "{engine:?} mixed batch: worst cosine {worst_cosine:.8}, worst max abs diff {worst_diff:.2e}"
    );
    // The rows without a reference are still unit vectors (modules.json has Normalize).
    for e in &got {
        let norm: f32 = e.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
    }
}

#[test]
fn the_cpu_device_runs_the_cpu_kernels_unless_turned_off() {
    let dir = model_dir();
    let on = TextEmbedding::load_dir(&dir, Device::Cpu, candle_core::Device::Cpu, true).unwrap();
    assert_eq!(on.engine(), Engine::CpuKernels);
    let off = TextEmbedding::load_dir(&dir, Device::Cpu, candle_core::Device::Cpu, false).unwrap();
    assert_eq!(off.engine(), Engine::Candle);
    // An activation the kernels do not implement keeps candle's BERT, which has it.
    let relu = variant(|d| {
        let path = d.join("config.json");
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        config["hidden_act"] = "relu".into();
        std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
    });
    let m =
        TextEmbedding::load_dir(relu.path(), Device::Cpu, candle_core::Device::Cpu, true).unwrap();
    assert_eq!(m.engine(), Engine::Candle);
}

fn cosine(a: &[f32], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| f64::from(x) * y).sum();
    let na = a.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
    let nb = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// `precision = "int8"`: every reference sentence, alone and all in one request, within
/// cosine 0.995 of the reference embedding and of the fp32 kernels' own.
#[test]
fn int8_embeddings_stay_close_to_the_reference_and_to_fp32() {
    let spec = ModelSpec::TextEmbedding {
        dir: model_dir(),
        cpu_kernels: true,
        precision: Precision::Int8,
    };
    let int8 = load(&spec, &Device::Cpu).unwrap();
    let fp32 = model();
    let all: Vec<&str> = reference().sentences.iter().map(String::as_str).collect();
    let embed = |m: &Arc<dyn Model>, batch: &[&str]| {
        let p = m.prepare(vec![texts(batch)]).unwrap();
        rows(&m.forward(&[p]).unwrap()[0][0])
    };
    let fp32_rows = embed(&fp32, &all);
    let together = embed(&int8, &all);
    let (mut worst_ref, mut worst_fp32) = (1.0f64, 1.0f64);
    for (i, s) in all.iter().enumerate() {
        let alone = embed(&int8, &[s]).remove(0);
        let fp32_row: Vec<f64> = fp32_rows[i].iter().map(|&x| f64::from(x)).collect();
        for (got, how) in [(&alone, "alone"), (&together[i], "in one request")] {
            let (to_ref, to_fp32) = (
                cosine(got, &reference().embeddings[i]),
                cosine(got, &fp32_row),
            );
            assert!(
                to_ref >= MIN_COSINE_INT8 && to_fp32 >= MIN_COSINE_INT8,
                "int8, {how}: sentence {i} ({s:?}): cosine {to_ref:.5} to the reference, \
                 {to_fp32:.5} to fp32"
            );
            worst_ref = worst_ref.min(to_ref);
            worst_fp32 = worst_fp32.min(to_fp32);
        }
    }
    eprintln!("int8: worst cosine {worst_ref:.6} to the reference, {worst_fp32:.6} to fp32");
}

/// Int8 exists on the CPU kernels only: asked for on candle's BERT it is a load error, not
/// a silent fp32 model.
#[test]
fn int8_needs_the_cpu_kernels() {
    let dir = model_dir();
    let cpu = candle_core::Device::Cpu;
    let int8 = TextEmbedding::load_dir_with_precision(
        &dir,
        Device::Cpu,
        cpu.clone(),
        true,
        Precision::Int8,
    )
    .unwrap();
    assert_eq!(
        (int8.engine(), int8.precision()),
        (Engine::CpuKernels, Precision::Int8)
    );
    let fp32 = TextEmbedding::load_dir(&dir, Device::Cpu, cpu.clone(), true).unwrap();
    assert_eq!(fp32.precision(), Precision::Fp32);
    let err =
        TextEmbedding::load_dir_with_precision(&dir, Device::Cpu, cpu, false, Precision::Int8)
            .unwrap_err();
    assert!(
        matches!(&err, LoadError::Spec { message } if message.contains("int8")),
        "{err}"
    );
}

#[test]
fn prepare_counts_tokens_and_truncates_at_max_seq_length() {
    let m = model();
    let p = m.prepare(vec![texts(&["hello"])]).unwrap();
    // [CLS] hello [SEP]
    assert_eq!(p.tokens, 3);
    assert_eq!(p.token_ids.len(), 1);
    assert_eq!(p.token_ids[0].len(), 3);

    let long = long_text(1000);
    let p = m.prepare(vec![texts(&["hello", &long])]).unwrap();
    assert_eq!(p.rows, 2);
    assert_eq!(
        p.tokens, 256,
        "truncated at sentence_bert_config.json's max_seq_length"
    );
    assert_eq!(p.token_ids[0].len(), 3);
    assert_eq!(p.token_ids[1].len(), 256);
    // Truncation keeps [SEP] at the end, as the reference tokenizer does.
    assert_eq!(p.token_ids[1].last(), p.token_ids[0].last());
    let out = m.forward(&[p]).unwrap();
    assert_eq!(out[0][0].shape, vec![2, 384]);
}

#[test]
fn truncation_is_the_requests_choice_and_is_counted() {
    use quiver_kernels::{InputError, PrepareOptions, TruncationSide};
    let m = model();
    let long = long_text(1000);
    let whole = m
        .as_text_embedding()
        .unwrap()
        .tokens_of(&long, true)
        .unwrap()
        .len();
    assert!(whole > 256, "{whole} tokens");
    // The default cuts, and counts the rows it cut.
    let p = m.prepare(vec![texts(&["hello", &long])]).unwrap();
    assert_eq!(p.truncated, 1);
    // Off: refused with the numbers, naming the row.
    let off = PrepareOptions {
        truncate: false,
        side: TruncationSide::Right,
    };
    let err = m
        .prepare_with(vec![texts(&["hello", &long])], &off)
        .unwrap_err();
    assert_eq!(
        err,
        InputError::TooLong {
            name: text::INPUT.to_owned(),
            index: 1,
            tokens: whole,
            limit: 256,
        }
    );
    // A text within the limit passes either way, uncounted.
    let p = m.prepare_with(vec![texts(&["hello"])], &off).unwrap();
    assert_eq!(p.truncated, 0);
    // Left keeps the end: [CLS], then the last 254 tokens, then [SEP].
    let left = PrepareOptions {
        truncate: true,
        side: TruncationSide::Left,
    };
    let l = m.prepare_with(vec![texts(&[&long])], &left).unwrap();
    let r = m.prepare(vec![texts(&[&long])]).unwrap();
    let all = m
        .as_text_embedding()
        .unwrap()
        .tokens_of(&long, true)
        .unwrap();
    assert_eq!(l.token_ids[0].len(), 256);
    assert_eq!(l.token_ids[0].first(), r.token_ids[0].first(), "[CLS]");
    assert_eq!(l.token_ids[0].last(), r.token_ids[0].last(), "[SEP]");
    let tail: Vec<u32> = all[all.len() - 255..all.len() - 1]
        .iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(&l.token_ids[0][1..255], tail.as_slice());
    assert_ne!(l.token_ids[0], r.token_ids[0]);
}

#[test]
fn empty_text_is_embedded() {
    let m = model();
    let p = m.prepare(vec![texts(&[""])]).unwrap();
    assert_eq!(p.tokens, 2, "[CLS] [SEP]");
    let out = m.forward(&[p]).unwrap();
    let e = &rows(&out[0][0])[0];
    assert!(e.iter().all(|v| v.is_finite()));
}

#[test]
fn signature_and_bad_inputs() {
    let m = model();
    assert_eq!(m.kind(), "embedding");
    let sig = m.signature();
    assert_eq!(sig.inputs[0].name, "text");
    assert_eq!(sig.inputs[0].datatype, DataType::Bytes);
    assert_eq!(sig.outputs[0].name, "embedding");
    assert_eq!(sig.outputs[0].shape, vec![-1, 384]);

    let bad_utf8 = HostTensor::new(
        "text",
        vec![2],
        TensorData::Bytes(vec![b"fine".to_vec(), vec![0xff, 0xfe]]),
    )
    .unwrap();
    let err = m.prepare(vec![bad_utf8]).unwrap_err();
    assert!(
        matches!(err, InputError::BadText { index: 1, .. }),
        "{err:?}"
    );

    let mut wide = texts(&["a", "b"]);
    wide.shape = vec![1, 2];
    assert!(matches!(
        m.prepare(vec![wide]).unwrap_err(),
        InputError::WrongShape { .. }
    ));

    let fp32 = HostTensor::new("text", vec![1], TensorData::F32(vec![1.0])).unwrap();
    assert!(matches!(
        m.prepare(vec![fp32]).unwrap_err(),
        InputError::WrongDatatype { .. }
    ));

    let empty = HostTensor::new("text", vec![0], TensorData::Bytes(vec![])).unwrap();
    assert!(matches!(
        m.prepare(vec![empty]).unwrap_err(),
        InputError::EmptyBatch { .. }
    ));

    // A Prepared that the model did not make is a typed error, not a panic.
    let mut forged = m.prepare(vec![texts(&["x"])]).unwrap();
    forged.token_ids.clear();
    assert!(m.forward(&[forged]).is_err());
}

/// A copy of the model directory whose weights are a symlink, with `edit` applied.
fn variant(edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let src = model_dir();
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "tokenizer.json",
        "modules.json",
        "sentence_bert_config.json",
    ] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    std::fs::create_dir(dir.path().join("1_Pooling")).unwrap();
    std::fs::copy(
        src.join("1_Pooling/config.json"),
        dir.path().join("1_Pooling/config.json"),
    )
    .unwrap();
    let weights = std::fs::canonicalize(src.join("model.safetensors")).unwrap();
    std::os::unix::fs::symlink(weights, dir.path().join("model.safetensors")).unwrap();
    edit(dir.path());
    dir
}

#[test]
fn unsupported_pooling_is_a_load_error_naming_the_file() {
    let dir = variant(|d| {
        std::fs::write(
            d.join("1_Pooling/config.json"),
            r#"{"pooling_mode_mean_tokens": false, "pooling_mode_max_tokens": true}"#,
        )
        .unwrap();
    });
    let err = TextEmbedding::load_dir(dir.path(), Device::Cpu, candle_core::Device::Cpu, true)
        .unwrap_err();
    assert!(matches!(err, LoadError::Config { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("pooling_mode_max_tokens"), "{text}");
    assert!(text.contains("1_Pooling"), "{text}");
}

#[test]
fn defaults_without_the_sentence_transformers_files() {
    // A bare Hugging Face BERT directory: mean pooling, no normalisation, max_seq_length 256.
    let dir = variant(|d| {
        std::fs::remove_file(d.join("modules.json")).unwrap();
        std::fs::remove_file(d.join("sentence_bert_config.json")).unwrap();
        std::fs::remove_dir_all(d.join("1_Pooling")).unwrap();
    });
    let m =
        TextEmbedding::load_dir(dir.path(), Device::Cpu, candle_core::Device::Cpu, true).unwrap();
    assert_eq!(m.pooling(), Pooling::Mean);
    assert!(!m.normalizes());
    assert_eq!(m.max_seq_length(), text::DEFAULT_MAX_SEQ_LENGTH);
    // Without Normalize the embedding is the reference's direction, not of unit length.
    let s = &reference().sentences[0];
    let out = m.forward(&[m.prepare(vec![texts(&[s])]).unwrap()]).unwrap();
    let e = &rows(&out[0][0])[0];
    let norm: f32 = e.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() > 1e-3, "norm {norm}");
    let unit: Vec<f32> = e.iter().map(|v| v / norm).collect();
    check(0, &unit, "unnormalised, normalised afterwards");
}

#[test]
fn cls_pooling_is_independent_of_padding() {
    let dir = variant(|d| {
        std::fs::write(
            d.join("1_Pooling/config.json"),
            r#"{"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}"#,
        )
        .unwrap();
    });
    let m =
        TextEmbedding::load_dir(dir.path(), Device::Cpu, candle_core::Device::Cpu, true).unwrap();
    assert_eq!(m.pooling(), Pooling::Cls);
    let short = "hello";
    let alone = m
        .forward(&[m.prepare(vec![texts(&[short])]).unwrap()])
        .unwrap();
    let alone = rows(&alone[0][0]).remove(0);
    let long = long_text(200);
    let mixed = m
        .forward(&[m.prepare(vec![texts(&[&long, short])]).unwrap()])
        .unwrap();
    let mixed = rows(&mixed[0][0]).remove(1);
    let diff = alone
        .iter()
        .zip(&mixed)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff <= 1e-5, "max abs diff {diff}");
    // CLS differs from mean pooling.
    let mean = rows(
        &model()
            .forward(&[model().prepare(vec![texts(&[short])]).unwrap()])
            .unwrap()[0][0],
    )
    .remove(0);
    let gap = alone
        .iter()
        .zip(&mean)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(gap > 1e-3, "CLS and mean pooling agree: {gap}");
}

#[test]
fn pool_masks_padding_and_normalises() {
    let dev = candle_core::Device::Cpu;
    // Two rows of three tokens, width 2; row 1 has one padded token holding garbage.
    let hidden = Tensor::from_vec(
        vec![
            1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 1.0, 1.0, 3.0, -1.0, 1e6, -1e6,
        ],
        (2, 3, 2),
        &dev,
    )
    .unwrap();
    let mask = Tensor::from_vec(vec![1.0f32, 1.0, 1.0, 1.0, 1.0, 0.0], (2, 3), &dev).unwrap();
    let mean: Vec<Vec<f32>> = pool(&hidden, &mask, Pooling::Mean, false)
        .unwrap()
        .to_vec2()
        .unwrap();
    assert_eq!(mean, vec![vec![3.0, 4.0], vec![2.0, 0.0]]);
    let unit: Vec<Vec<f32>> = pool(&hidden, &mask, Pooling::Mean, true)
        .unwrap()
        .to_vec2()
        .unwrap();
    assert!((unit[0][0] - 0.6).abs() < 1e-6 && (unit[0][1] - 0.8).abs() < 1e-6);
    assert_eq!(unit[1], vec![1.0, 0.0]);
    let cls: Vec<Vec<f32>> = pool(&hidden, &mask, Pooling::Cls, false)
        .unwrap()
        .to_vec2()
        .unwrap();
    assert_eq!(cls, vec![vec![1.0, 2.0], vec![1.0, 1.0]]);
    // A zero vector stays zero instead of becoming NaN.
    let zeros = Tensor::zeros((1, 2, 2), candle_core::DType::F32, &dev).unwrap();
    let ones = Tensor::ones((1, 2), candle_core::DType::F32, &dev).unwrap();
    let z: Vec<Vec<f32>> = pool(&zeros, &ones, Pooling::Mean, true)
        .unwrap()
        .to_vec2()
        .unwrap();
    assert_eq!(z, vec![vec![0.0, 0.0]]);
}
