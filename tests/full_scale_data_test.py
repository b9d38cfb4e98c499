"""Full-scale loaders, without downloads: TFDS mock_data, fake trees, fakes.

Every TFDS-backed loader runs through `tfds.testing.mock_data` and the real
`tfds.data_source` path (TF-free). Image folders and Hendrycks' `.npy`
layout are generated in temporary directories.
"""

import importlib.util
import inspect
import os
import tempfile
from unittest import mock

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl.testing import absltest, parameterized
from PIL import Image

from configs import generalizeformer_pacs, meta_ttt_cifar
from tta_jax.data import benchmarks, streams
from tta_jax.data.images import full_scale, image_folder, tfds_sources

HAVE_CORRUPTIONS = (
  importlib.util.find_spec('tta_jax.data.images.corruptions') is not None
)


def _tempdir(test) -> str:
  tmp = tempfile.TemporaryDirectory()
  test.addCleanup(tmp.cleanup)
  return tmp.name


def _check_batch(test, batch, n, shape, num_classes):
  test.assertEqual(batch['image'].shape, (n, *shape))
  test.assertEqual(batch['image'].dtype, np.float32)
  test.assertGreaterEqual(batch['image'].min(), 0.0)
  test.assertLessEqual(batch['image'].max(), 1.0)
  test.assertEqual(batch['label'].dtype, np.int32)
  test.assertEqual(batch['label'].shape, (n,))
  test.assertTrue(
    np.all((batch['label'] >= 0) & (batch['label'] < num_classes))
  )


class _Counting:
  """A fake data source recording which records are read."""

  def __init__(self, examples):
    self.examples, self.reads = examples, []

  def __len__(self):
    return len(self.examples)

  def __getitem__(self, i):
    self.reads.append(i)
    return self.examples[i]


class TfdsMockTest(parameterized.TestCase):
  """The real `tfds.data_source` path, under `tfds.testing.mock_data`."""

  def test_cifar10_corrupted(self):
    with tfds.testing.mock_data(num_examples=7):
      domains = full_scale.load_domains(
        'cifar10_corrupted',
        corruptions=['gaussian_noise', 'glass_blur'],
        severity=3,
        num_threads=2,
      )
      raw = tfds.data_source(
        'cifar10_corrupted/frosted_glass_blur_3', split='test', download=False
      )
      self.assertEqual(
        [d.name for d in domains], ['gaussian_noise', 'glass_blur']
      )
      d = domains[1]
      self.assertEqual(
        d.info['tfds_name'], 'cifar10_corrupted/frosted_glass_blur_3'
      )
      self.assertEqual(
        (d.info['corruption'], d.info['severity']), ('glass_blur', 3)
      )
      self.assertLen(d, 7)
      batch = d.source[np.arange(7)]
      _check_batch(self, batch, 7, (32, 32, 3), 10)
      # Pixels and labels are the records', scaled to [0, 1].
      np.testing.assert_array_equal(
        np.rint(batch['image'][4] * 255).astype(np.uint8), raw[4]['image']
      )
      self.assertEqual(batch['label'][4], raw[4]['label'])
      # One example reads the same alone as in a batch.
      np.testing.assert_array_equal(
        d.source[np.array([4])]['image'][0], batch['image'][4]
      )
      np.testing.assert_array_equal(d.source.labels, batch['label'])

  def test_cifar_benchmark_with_source_train_split(self):
    # configs/meta_ttt_cifar.py: the clean train split feeds meta-training.
    config = meta_ttt_cifar.get_config('small')
    with tfds.testing.mock_data(num_examples=6):
      bench = benchmarks.build(config.data, config.setting)
      (train,), (val,) = bench.meta_source_domains()
      self.assertEqual(train.source.name, 'cifar10:train')
      self.assertEqual(val.source.name, 'cifar10:test')
      _check_batch(self, train.source[np.arange(3)], 3, (32, 32, 3), 10)
    # Without it (plain TTA), meta-training says what is missing.
    config.data.source_train_name = ''
    with tfds.testing.mock_data(num_examples=6):
      bench = benchmarks.build(config.data, config.setting)
    self.assertIsNone(bench.source_train)
    with self.assertRaisesRegex(ValueError, 'no labelled source data'):
      bench.meta_source_domains()

  def test_domainnet_leave_one_domain_out(self):
    config = generalizeformer_pacs.get_config('dataset=domainnet')
    config.data.loader_kwargs.update(
      domains=('clipart', 'sketch'), image_size=32
    )
    with tfds.testing.mock_data(num_examples=4):
      (held, bench), _ = benchmarks.targets(config.data, config.setting)
      self.assertEqual(held, 'clipart')
      self.assertLen(bench.domains[0].source, 8)  # train + test, once each
      (train,), (val,) = bench.meta_source_domains()
      self.assertEqual(train.source.name, 'domainnet/sketch:train')
      self.assertEqual(val.source.name, 'domainnet/sketch:test')
      _check_batch(self, train.source[np.arange(2)], 2, (32, 32, 3), 345)

  def test_gradual_severities_make_one_domain_each_and_reuse_sources(self):
    with tfds.testing.mock_data(num_examples=3):
      domains = full_scale.cifar10_corrupted(
        corruptions=['fog'], severities=(1, 2, 1), num_threads=1
      )
    self.assertEqual([d.name for d in domains], ['fog@1', 'fog@2', 'fog@1'])
    self.assertIs(domains[0].source, domains[2].source)
    self.assertEqual(domains[1].info['tfds_name'], 'cifar10_corrupted/fog_2')

  @parameterized.parameters(('cifar10', 10), ('cifar100', 100))
  def test_clean_cifar(self, name, num_classes):
    with tfds.testing.mock_data(num_examples=5):
      (d,) = full_scale.load_domains(name, num_threads=1)
      self.assertEqual(d.name, 'clean')
      self.assertEqual(d.info['num_classes'], num_classes)
      _check_batch(
        self, d.source[np.array([0, 4])], 2, (32, 32, 3), num_classes
      )

  def test_imagenet2012_corrupted_subset(self):
    with tfds.testing.mock_data(num_examples=10):
      full = full_scale.imagenet2012_corrupted(
        corruptions=['snow'], num_threads=2
      )
      sub = full_scale.imagenet2012_corrupted(
        corruptions=['snow', 'fog'], num_examples=4, seed=3, num_threads=2
      )
      self.assertLen(full[0], 10)
      self.assertEqual([len(d) for d in sub], [4, 4])
      # The same record indices in every corruption.
      np.testing.assert_array_equal(
        sub[0].source.indices, sub[1].source.indices
      )
      np.testing.assert_array_equal(
        sub[0].source.indices,
        np.sort(np.random.default_rng(3).permutation(10)[:4]),
      )
      batch = sub[0].source[np.arange(4)]
      _check_batch(self, batch, 4, (224, 224, 3), 1000)
      np.testing.assert_array_equal(
        batch['image'], full[0].source[sub[0].source.indices]['image']
      )
      np.testing.assert_array_equal(sub[0].source.labels, batch['label'])

  @parameterized.parameters(
    ('imagenet_r', 1, 988),
    ('imagenet_a', 6, 988),
  )
  def test_imagenet_200_class_subsets(self, name, first, last):
    with tfds.testing.mock_data(num_examples=3):
      (d,) = full_scale.load_domains(name, num_threads=1)
      # Mock images have random sizes: resize 256 + crop gives 224 squares.
      _check_batch(self, d.source[np.arange(3)], 3, (224, 224, 3), 1000)
    subset = d.info['class_subset']
    self.assertEqual(subset.dtype, np.int32)
    self.assertLen(np.unique(subset), 200)
    self.assertTrue(np.all(np.diff(subset) > 0))
    # First and last indices as hendrycks' eval.py lists them.
    self.assertEqual((subset[0], subset[-1]), (first, last))
    self.assertEqual(d.info['num_classes'], 1000)

  def test_imagenet_r_subset_matches_the_official_index_list(self):
    # The index list in the comment of hendrycks/imagenet-r eval.py.
    official_prefix = [1, 2, 4, 6, 8, 9, 11, 13, 22, 23, 26, 29, 31, 39, 47]
    wnids = tfds_sources.imagenet_wnids()
    idx = sorted(wnids.index(w) for w in full_scale.IMAGENET_R_WNIDS)
    self.assertEqual(idx[:15], official_prefix)
    self.assertEqual(wnids[0], 'n01440764')

  def test_imagenet_sketch_has_no_subset(self):
    with tfds.testing.mock_data(num_examples=2):
      (d,) = full_scale.imagenet_sketch(
        num_threads=1, image_size=64, resize_size=72
      )
      _check_batch(self, d.source[np.array([1])], 1, (64, 64, 3), 1000)
    self.assertNotIn('class_subset', d.info)

  def test_domainnet(self):
    with tfds.testing.mock_data(num_examples=4):
      domains = full_scale.domainnet(
        domains=['clipart', 'sketch'], image_size=40, num_threads=2
      )
      self.assertEqual([d.name for d in domains], ['clipart', 'sketch'])
      self.assertLen(domains[0].info['class_names'], 345)
      self.assertEqual(domains[0].info['num_classes'], 345)
      _check_batch(
        self, domains[1].source[np.array([3, 0])], 2, (40, 40, 3), 345
      )
    with self.assertRaisesRegex(ValueError, 'unknown DomainNet domains'):
      full_scale.domainnet(domains=['photo'])

  @absltest.skipIf(
    not HAVE_CORRUPTIONS, 'tta_jax.data.images.corruptions missing'
  )
  def test_cifar100_generated_corruptions(self):
    with tfds.testing.mock_data(num_examples=6):
      domains = full_scale.cifar100_corrupted(
        corruptions=['gaussian_noise', 'contrast'],
        severity=5,
        seed=1,
        num_threads=1,
      )
      (clean,) = full_scale.cifar100(num_threads=1)
      idx = np.array([5, 0, 2])
      ref = clean.source[idx]
      for d in domains:
        batch = d.source[idx]
        _check_batch(self, batch, 3, (32, 32, 3), 100)
        np.testing.assert_array_equal(batch['label'], ref['label'])
        self.assertGreater(np.abs(batch['image'] - ref['image']).mean(), 0.01)
        self.assertTrue(d.info['generated'])
      # Keyed by example index: the same pixels alone or in a batch.
      np.testing.assert_allclose(
        domains[0].source[np.array([2])]['image'][0],
        domains[0].source[idx]['image'][2],
        atol=1e-6,
      )
      np.testing.assert_array_equal(
        domains[0].source.labels, clean.source.labels
      )

  def test_streams_run_over_tfds_domains(self):
    with tfds.testing.mock_data(num_examples=5):
      domains = full_scale.cifar10_corrupted(
        corruptions=['fog', 'snow'], num_threads=1
      )
      for setting in ('continual', 'correlated'):
        p = streams.plan(setting, domains, batch_size=4, seed=0)
        batches = list(streams.iterate(p, domains))
        self.assertLen(batches, 4)
        self.assertEqual(batches[-1].batch['image'].shape, (4, 32, 32, 3))
        self.assertEqual(batches[-1].batch['mask'].sum(), 1)

  def test_missing_tfds_dataset_says_how_to_prepare_it(self):
    empty = _tempdir(self)
    with self.assertRaisesRegex(
      FileNotFoundError, r'(?s)tfds build .*array_record'
    ):
      full_scale.cifar10_corrupted(corruptions=['fog'], data_dir=empty)
    self.assertEqual(os.listdir(empty), [])  # nothing was downloaded


class TfdsSourceTest(parameterized.TestCase):
  """`TfdsSource`'s conversion on fake records (shapes TFDS cannot mock)."""

  def _examples(self):
    rng = np.random.default_rng(0)
    return [
      {'image': rng.integers(0, 256, (300, 400, 3), np.uint8), 'label': 3},
      {'image': rng.integers(0, 256, (256, 240), np.uint8), 'label': 1},
      {'image': rng.integers(0, 256, (250, 250, 1), np.uint8), 'label': 0},
      {'image': rng.integers(0, 256, (230, 500, 4), np.uint8), 'label': 2},
    ] * 3

  def test_reads_only_the_requested_records(self):
    fake = _Counting(self._examples())
    src = tfds_sources.TfdsSource(
      fake,
      num_classes=4,
      num_threads=2,
      preprocess=image_folder.Preprocess(224, 256),
    )
    batch = src[np.array([9, 1, 6])]
    self.assertEqual(sorted(fake.reads), [1, 6, 9])
    _check_batch(self, batch, 3, (224, 224, 3), 4)
    np.testing.assert_array_equal(batch['label'], [1, 1, 0])
    # A subset's labels read only the subset's records.
    fake.reads.clear()
    sub = full_scale.SubsetSource(src, np.array([2, 5]))
    np.testing.assert_array_equal(sub.labels, [0, 1])
    self.assertEqual(sorted(fake.reads), [2, 5])
    # Grayscale records become three equal channels.
    np.testing.assert_array_equal(
      batch['image'][0, ..., 0], batch['image'][0, ..., 2]
    )

  def test_bad_records_and_indices_fail_clearly(self):
    ex = self._examples()
    src = tfds_sources.TfdsSource(
      ex, num_classes=3, num_threads=1, preprocess=image_folder.Preprocess(32)
    )
    with self.assertRaisesRegex(ValueError, r'labels must lie in \[0, 3\)'):
      src[np.array([0])]
    with self.assertRaisesRegex(IndexError, r'must lie in \[0, 12\)'):
      src[np.array([12])]
    with self.assertRaisesRegex(TypeError, '1-D integer'):
      src[np.array([[0]])]
    with self.assertRaisesRegex(ValueError, 'different shapes'):
      tfds_sources.TfdsSource(ex, num_classes=4, num_threads=1)[
        np.array([0, 1])
      ]
    with self.assertRaisesRegex(ValueError, 'is empty'):
      tfds_sources.TfdsSource([], num_classes=4, name='nothing')


class PreprocessTest(absltest.TestCase):
  def test_resize_centre_crop_follows_torchvision_rounding(self):
    # 256 x 300 already has shorter side 256: no resize, crop offsets
    # top = round(32 / 2) = 16, left = round(76 / 2) = 38.
    h, w = 256, 300
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
    image = np.stack([rows % 256, cols % 256, (rows + cols) % 256], -1).astype(
      np.uint8
    )
    out = image_folder.Preprocess(224, 256)(image)
    self.assertEqual(out.shape, (224, 224, 3))
    np.testing.assert_array_equal(out, image[16:240, 38:262])

  def test_resize_keeps_aspect_then_crops(self):
    image = Image.new('RGB', (400, 300), (10, 200, 30))  # W x H
    out = image_folder.Preprocess(224, 256)(image)
    self.assertEqual(out.shape, (224, 224, 3))
    np.testing.assert_array_equal(out[100, 100], [10, 200, 30])
    self.assertEqual(image_folder.Preprocess(50)(image).shape, (50, 50, 3))

  def test_no_resize_is_the_identity(self):
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    self.assertIs(image_folder.Preprocess()(image), image)

  def test_bad_sizes(self):
    with self.assertRaisesRegex(ValueError, 'smaller than the crop'):
      image_folder.Preprocess(224, 200).check()
    with self.assertRaisesRegex(ValueError, 'needs an image_size'):
      image_folder.Preprocess(None, 256).check()


class ValidateTest(absltest.TestCase):
  """The check wrapped around generated (float) sources."""

  def test_rejects_bad_batches(self):
    good = {
      'image': np.zeros((2, 4, 4, 3), np.float32),
      'label': np.zeros(2, np.int32),
    }
    image_folder.validate_batch(good, 'ok')
    for bad, regex in (
      ({**good, 'image': good['image'] + np.float32(1.5)}, 'outside'),
      ({**good, 'image': np.full((2, 4, 4, 3), np.nan, np.float32)}, 'outside'),
      ({**good, 'image': good['image'][0]}, r'\[n, H, W, C\]'),
      ({**good, 'image': good['image'].astype(np.float64)}, 'float32'),
      ({**good, 'label': np.zeros(3, np.int32)}, 'int32 labels'),
    ):
      with self.assertRaisesRegex(ValueError, regex):
        image_folder.validate_batch(bad, 'bad')


def _save(path, size, mode, value):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  color = {'RGB': (value, 0, 0), 'L': value, 'RGBA': (value, 0, 0, 255)}
  Image.new(mode, size, color[mode]).save(path)


class ImageFolderTest(parameterized.TestCase):
  """A generated tree: 2 domains x 3 classes; red = 80 * class id."""

  def setUp(self):
    super().setUp()
    self.root = _tempdir(self)
    kinds = [('RGB', '.JPG'), ('RGBA', '.png'), ('L', '.png')]
    for d, n_per_class in (('photo', 3), ('art', 2)):
      for c in ('dog', 'cat', 'horse'):  # unsorted on purpose
        for j in range(n_per_class):
          mode, ext = kinds[j]
          _save(
            os.path.join(self.root, d, c, f'img{j}{ext}'),
            (20 + 7 * j, 30),
            mode,
            80 * {'cat': 0, 'dog': 1, 'horse': 2}[c],
          )
      # Not images: a hidden AppleDouble file and a text file.
      with open(os.path.join(self.root, d, 'cat', '._img0.png'), 'wb') as f:
        f.write(b'junk')
      with open(os.path.join(self.root, d, 'cat', 'notes.txt'), 'w') as f:
        f.write('x')

  def test_domains_classes_and_labels(self):
    domains = full_scale.load_domains(
      'image_folder', data_dir=self.root, image_size=16, num_threads=2
    )
    self.assertEqual([d.name for d in domains], ['art', 'photo'])
    self.assertEqual(domains[0].info['class_names'], ['cat', 'dog', 'horse'])
    self.assertEqual([len(d) for d in domains], [6, 9])
    for d in domains:
      batch = d.source[np.arange(len(d))]
      _check_batch(self, batch, len(d), (16, 16, 3), 3)
      np.testing.assert_array_equal(batch['label'], d.source.labels)
      # The red level encodes the class; L images are grey, so red too.
      red = np.rint(batch['image'][:, 8, 8, 0] * 255)
      np.testing.assert_allclose(red, 80 * batch['label'], atol=2)

  def test_reads_only_the_requested_files(self):
    (d,) = full_scale.image_folder_domains(
      data_dir=self.root, domains=['photo'], image_size=8, num_threads=1
    )
    with mock.patch.object(
      image_folder.Image, 'open', wraps=Image.open
    ) as opened:
      d.source[np.array([7, 2])]
    self.assertEqual(opened.call_count, 2)

  def test_holdout_split(self):
    kw = dict(
      data_dir=self.root,
      domains=['photo'],
      image_size=8,
      holdout_fraction=0.34,
      num_threads=1,
    )
    (train,) = full_scale.image_folder_domains(split='train', seed=1, **kw)
    (out,) = full_scale.image_folder_domains(split='holdout', seed=1, **kw)
    (again,) = full_scale.image_folder_domains(split='holdout', seed=1, **kw)
    (other,) = full_scale.image_folder_domains(split='holdout', seed=2, **kw)
    self.assertEqual((len(train), len(out)), (6, 3))  # int(9 * 0.34) = 3
    self.assertEqual(set(train.source.files) & set(out.source.files), set())
    self.assertLen(set(train.source.files) | set(out.source.files), 9)
    self.assertEqual(out.source.files, again.source.files)
    self.assertNotEqual(out.source.files, other.source.files)
    with self.assertRaisesRegex(ValueError, 'holdout_fraction'):
      full_scale.image_folder_domains(
        split='train', **{**kw, 'holdout_fraction': 0.0}
      )
    with self.assertRaisesRegex(ValueError, 'unknown split'):
      full_scale.image_folder_domains(split='val', **kw)

  def test_domains_must_share_classes(self):
    _save(os.path.join(self.root, 'art', 'zebra', 'z.png'), (5, 5), 'RGB', 1)
    with self.assertRaisesRegex(
      ValueError,
      r"'photo' has extra classes \[\] and lacks "
      r"\['zebra'\]",
    ):
      full_scale.image_folder_domains(data_dir=self.root)

  def test_layout_errors(self):
    with self.assertRaisesRegex(ValueError, 'no data folder given'):
      full_scale.image_folder_domains()
    with self.assertRaisesRegex(FileNotFoundError, 'not a directory'):
      full_scale.image_folder_domains(data_dir=os.path.join(self.root, 'no'))
    with self.assertRaisesRegex(
      FileNotFoundError, r"\['art_painting', 'cartoon'.*missing"
    ):
      full_scale.load_domains('pacs', data_dir=self.root)
    os.makedirs(os.path.join(self.root, 'empty', 'cat'))
    for c in ('dog', 'horse'):
      os.makedirs(os.path.join(self.root, 'empty', c))
    with self.assertRaisesRegex(FileNotFoundError, "'empty' has no images"):
      full_scale.image_folder_domains(data_dir=self.root)

  def test_pacs_layout(self):
    root = _tempdir(self)
    for d in full_scale.DOMAINBED_DOMAINS['pacs']:
      for c in ('guitar', 'dog'):
        _save(os.path.join(root, d, c, 'a.jpg'), (40, 30), 'RGB', 100)
    domains = full_scale.load_domains('pacs', data_dir=root, num_threads=1)
    self.assertEqual(
      [d.name for d in domains], ['art_painting', 'cartoon', 'photo', 'sketch']
    )
    _check_batch(self, domains[2].source[np.array([1, 0])], 2, (224, 224, 3), 2)
    self.assertEqual(domains[0].info['class_names'], ['dog', 'guitar'])

  def test_pacs_leave_one_domain_out(self):
    # configs/generalizeformer_pacs.py's benchmark on a generated tree.
    root = _tempdir(self)
    for d in full_scale.DOMAINBED_DOMAINS['pacs']:
      for c in ('guitar', 'dog'):
        for i in range(5):
          _save(os.path.join(root, d, c, f'{i}.jpg'), (40, 30), 'RGB', 50 * i)
    config = generalizeformer_pacs.get_config()
    config.data.loader_kwargs.update(data_dir=root, image_size=32)
    targets = benchmarks.targets(config.data, config.setting)
    self.assertEqual(
      [t for t, _ in targets], list(full_scale.DOMAINBED_DOMAINS['pacs'])
    )
    held, bench = targets[1]
    self.assertEqual([d.name for d in bench.domains], ['cartoon'])
    self.assertLen(bench.domains[0].source, 10)  # all of the held-out domain
    train, val = bench.meta_source_domains()
    self.assertEqual(
      [d.name for d in train], ['art_painting', 'photo', 'sketch']
    )
    self.assertEqual([len(d.source) for d in train], [8, 8, 8])  # 80 %
    self.assertEqual([len(d.source) for d in val], [2, 2, 2])
    _check_batch(self, train[0].source[np.arange(2)], 2, (32, 32, 3), 2)


def _hendrycks_dir(root, corruptions, n=4, num_classes=10):
  """Fake release: pixel value = 40 * severity + row, labels row % K."""
  for c in corruptions:
    images = np.zeros((5 * n, 32, 32, 3), np.uint8)
    for s in range(1, 6):
      for i in range(n):
        images[(s - 1) * n + i] = 40 * s + i
    np.save(os.path.join(root, f'{c}.npy'), images)
  np.save(
    os.path.join(root, 'labels.npy'),
    np.tile(np.arange(n) % num_classes, 5).astype(np.int64),
  )


class HendrycksTest(parameterized.TestCase):
  def test_npy_severity_slices_and_memory_map(self):
    root = _tempdir(self)
    _hendrycks_dir(root, ['gaussian_noise', 'fog'])
    domains = full_scale.load_domains(
      'cifar10_c',
      data_dir=root,
      corruptions=['fog', 'gaussian_noise'],
      severities=[3, 1],
    )
    self.assertEqual(
      [d.name for d in domains],
      ['fog@3', 'fog@1', 'gaussian_noise@3', 'gaussian_noise@1'],
    )
    src = domains[0].source
    self.assertIsInstance(src.images, np.memmap)  # nothing read up front
    batch = src[np.array([2, 0])]
    _check_batch(self, batch, 2, (32, 32, 3), 10)
    np.testing.assert_array_equal(batch['image'][:, 0, 0, 0] * 255, [122, 120])
    np.testing.assert_array_equal(batch['label'], [2, 0])
    self.assertEqual(
      domains[1].source[np.array([3])]['image'][0, 5, 5, 1],
      np.float32(43) / np.float32(255),
    )
    np.testing.assert_array_equal(src.labels, [0, 1, 2, 3])

  def test_cifar100_c_labels(self):
    root = _tempdir(self)
    _hendrycks_dir(root, ['snow'], n=3, num_classes=100)
    (d,) = full_scale.cifar100_c(data_dir=root, corruptions=['snow'])
    self.assertEqual(d.info['num_classes'], 100)
    _check_batch(self, d.source[np.arange(3)], 3, (32, 32, 3), 100)

  def test_npy_errors(self):
    root = _tempdir(self)
    _hendrycks_dir(root, ['fog'])
    with self.assertRaisesRegex(FileNotFoundError, r'shot_noise\.npy'):
      full_scale.cifar10_c(data_dir=root)
    with self.assertRaisesRegex(ValueError, 'pass data_dir'):
      full_scale.cifar10_c()
    np.save(os.path.join(root, 'snow.npy'), np.zeros((7, 32, 32, 3), np.uint8))
    with self.assertRaisesRegex(ValueError, '5 severities stacked'):
      full_scale.cifar10_c(data_dir=root, corruptions=['snow'])
    with self.assertRaisesRegex(ValueError, 'severities must lie'):
      full_scale.cifar10_c(data_dir=root, corruptions=['fog'], severity=6)
    with self.assertRaisesRegex(ValueError, 'unknown corruptions'):
      full_scale.cifar10_c(data_dir=root, corruptions=['fogg'])


class UnpreparedTfdsTest(parameterized.TestCase):
  @parameterized.parameters(('imagenet2012', 'validation'), ('cifar10', 'test'))
  def test_an_unprepared_dataset_says_how_to_prepare_it(self, name, split):
    with self.assertRaisesRegex(FileNotFoundError, 'never downloads'):
      tfds_sources.open_data_source(name, split, _tempdir(self))


class ImagenetFoldersTest(absltest.TestCase):
  """The released ImageNet-C / -R folder layouts, generated small."""

  def test_imagenet_c_folders_and_image_list(self):
    root = _tempdir(self)
    wnids = ['n01440764', 'n01443537']  # ImageNet-1k labels 0 and 1
    for c in ('fog', 'snow'):
      for k, w in enumerate(wnids):
        for j in range(3):
          _save(
            os.path.join(root, c, '5', w, f'v{j}.JPEG'),
            (224, 224),
            'RGB',
            100 * k,
          )
    domains = full_scale.imagenet_c(
      data_dir=root, corruptions=['fog', 'snow'], num_threads=2
    )
    self.assertEqual([len(d) for d in domains], [6, 6])
    batch = domains[0].source[np.arange(6)]
    _check_batch(self, batch, 6, (224, 224, 3), 1000)
    np.testing.assert_array_equal(batch['label'], [0, 0, 0, 1, 1, 1])
    listing = os.path.join(root, 'ids.txt')
    with open(listing, 'w') as f:
      f.write('n01443537/v2.JPEG\nn01440764/v0.JPEG\n')
    (d,) = full_scale.imagenet_c(
      data_dir=root, corruptions=['snow'], image_list=listing, num_threads=1
    )
    np.testing.assert_array_equal(d.source.labels, [1, 0])
    (d,) = full_scale.imagenet_c(
      data_dir=root, corruptions=['snow'], num_examples=4, seed=0, num_threads=1
    )
    self.assertLen(d, 4)
    with self.assertRaisesRegex(FileNotFoundError, 'no folder'):
      full_scale.imagenet_c(data_dir=root, corruptions=['frost'])

  def test_imagenet_c_extra_corruptions_are_the_shifted_domains(self):
    # MGG's pre-training learns from shifts disjoint from the 15 test ones.
    root = _tempdir(self)
    for c in full_scale.EXTRA_CORRUPTIONS:
      path = os.path.join(root, c, '3', 'n01443537', 'a.JPEG')
      _save(path, (224, 224), 'RGB', 9)
    data = ml_collections.ConfigDict(
      {'name': 'imagenet_c', 'loader_kwargs': {'data_dir': root, 'severity': 3}}
    )
    self.assertTrue(benchmarks.has_shifted_domains(data))
    domains = benchmarks.shifted_domains(data)
    self.assertEqual(
      [d.name for d in domains], list(full_scale.EXTRA_CORRUPTIONS)
    )
    self.assertEqual({d.info['severity'] for d in domains}, {3})
    self.assertEqual(domains[0].source.labels.tolist(), [1])
    self.assertEmpty(
      set(full_scale.EXTRA_CORRUPTIONS) & set(full_scale.CORRUPTIONS)
    )
    data.name = 'imagenet_r'
    self.assertFalse(benchmarks.has_shifted_domains(data))
    with self.assertRaisesRegex(ValueError, 'no shifted domains'):
      benchmarks.shifted_domains(data)

  def test_imagenet_r_folder(self):
    root = _tempdir(self)
    _save(os.path.join(root, 'n01484850', 'a.jpg'), (300, 200), 'RGB', 50)
    _save(os.path.join(root, 'n01443537', 'b.png'), (100, 120), 'L', 60)
    (d,) = full_scale.imagenet_r(folder=root, num_threads=1)
    np.testing.assert_array_equal(d.info['class_subset'], [1, 2])
    np.testing.assert_array_equal(d.source.labels, [1, 2])
    _check_batch(self, d.source[np.array([0, 1])], 2, (224, 224, 3), 1000)
    _save(os.path.join(root, 'not_a_wnid', 'c.png'), (10, 10), 'RGB', 0)
    with self.assertRaisesRegex(ValueError, 'must be ImageNet wnids'):
      full_scale.imagenet_r(folder=root)


class RegistryTest(absltest.TestCase):
  def test_unknown_dataset_lists_the_valid_ones(self):
    with self.assertRaisesRegex(
      ValueError,
      r"(?s)unknown dataset 'cifar11'"
      r".*'cifar10_corrupted'.*'terra_incognita'",
    ):
      full_scale.load_domains('cifar11')

  def test_unknown_argument(self):
    with self.assertRaisesRegex(TypeError, r"unknown arguments \['sevrity'\]"):
      full_scale.load_domains('cifar10_c', sevrity=5)

  def test_corruption_loaders_take_severities(self):
    # The gradual setting passes severities=(1, ..., 5, ..., 1).
    for name in (
      'cifar10_corrupted',
      'cifar10_c',
      'cifar100_c',
      'cifar100_corrupted',
      'imagenet2012_corrupted',
      'imagenet_c',
    ):
      params = inspect.signature(full_scale.LOADERS[name]).parameters
      self.assertIn('severities', params)


if __name__ == '__main__':
  absltest.main()
