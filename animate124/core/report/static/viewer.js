// The results page's 3-D viewer: the animated .glb (inlined as base64 by report_files/mesh_glb.js, since a page
// opened from disk cannot fetch files) in three.js (window.A124Three, the vendored bundle), with orbit controls,
// play / pause and a time slider. window.a124Viewer tells tests and users its state: ready, error, duration,
// playing, time (seconds) and setTime(seconds).
(function () {
  "use strict";
  const state = { ready: false, error: null, duration: 0, playing: false, time: 0, frames: 0 };
  window.a124Viewer = state;

  function fail(message) {
    state.error = message;
    const box = document.getElementById("viewer-status");
    if (box) box.textContent = message;
    console.error("animate124 viewer: " + message);
  }

  function decode(base64) {
    const bytes = atob(base64);
    const out = new Uint8Array(bytes.length);
    for (let i = 0; i < bytes.length; i++) out[i] = bytes.charCodeAt(i);
    return out.buffer;
  }

  // the box holding the object at every keyframe (morph targets move vertices outside the base's box)
  function animatedBounds(root, T) {
    const box = new T.Box3();
    const p = new T.Vector3();
    root.updateMatrixWorld(true);
    root.traverse(function (node) {
      if (!node.isMesh) return;
      const geometry = node.geometry;
      const base = geometry.attributes.position;
      const targets = (geometry.morphAttributes && geometry.morphAttributes.position) || [];
      for (let t = -1; t < targets.length; t++) {
        for (let i = 0; i < base.count; i++) {
          p.fromBufferAttribute(base, i);
          if (t >= 0) {
            p.x += targets[t].getX(i);
            p.y += targets[t].getY(i);
            p.z += targets[t].getZ(i);
          }
          box.expandByPoint(p.applyMatrix4(node.matrixWorld));
        }
      }
    });
    return box;
  }

  function start() {
    const T = window.A124Three;
    const canvas = document.getElementById("viewer-canvas");
    if (!canvas) return;
    if (!T) return fail("three.js did not load (report_files/three-viewer.min.js)");
    if (!window.A124_GLB_BASE64) return fail("no mesh: report_files/mesh_glb.js is missing");
    const slider = document.getElementById("viewer-time");
    const button = document.getElementById("viewer-play");
    const label = document.getElementById("viewer-label");

    const renderer = new T.WebGLRenderer({ canvas: canvas, antialias: true, preserveDrawingBuffer: true });
    renderer.setPixelRatio(1);
    renderer.setSize(canvas.clientWidth || 640, canvas.clientHeight || 480, false);
    const scene = new T.Scene();
    scene.background = new T.Color(canvas.dataset.background || "#ffffff");
    scene.add(new T.HemisphereLight(0xffffff, 0x8c8c8c, 2.2));
    const key = new T.DirectionalLight(0xffffff, 1.2);
    scene.add(key);
    const camera = new T.PerspectiveCamera(40, canvas.width / canvas.height, 0.01, 100);
    const controls = new T.OrbitControls(camera, canvas);
    const clock = new T.Clock();
    let mixer = null;
    let seconds_per_t = 1;

    function show(seconds) {
      state.time = seconds;
      // the clip loops, so its end would wrap to its start: show the last keyframe just before the end
      if (mixer) mixer.setTime(Math.min(seconds, state.duration * (1 - 1e-6)));
      slider.value = String(seconds);
      const t = seconds / seconds_per_t;
      label.textContent = "t = " + t.toFixed(3) + "  (" + seconds.toFixed(2) + " s of " + state.duration.toFixed(2) + " s)";
    }

    function setPlaying(playing) {
      state.playing = playing;
      button.textContent = playing ? "Pause" : "Play";
      clock.getDelta();
    }

    state.setTime = function (seconds) {
      setPlaying(false);
      show(Math.min(Math.max(Number(seconds), 0), state.duration));
      draw();
    };

    function draw() {
      key.position.copy(camera.position);
      renderer.render(scene, camera);
    }

    function loop() {
      requestAnimationFrame(loop);
      if (state.playing && state.duration > 0) {
        show((state.time + clock.getDelta()) % state.duration);
      }
      controls.update();
      draw();
    }

    new T.GLTFLoader().parse(
      decode(window.A124_GLB_BASE64),
      "",
      function (gltf) {
        scene.add(gltf.scene);
        if (gltf.animations.length) {
          mixer = new T.AnimationMixer(gltf.scene);
          const clip = gltf.animations[0];
          mixer.clipAction(clip).play();
          state.duration = clip.duration;
          const extras = (gltf.parser.json.animations[0] || {}).extras || {};
          state.frames = (extras.frame_times || []).length;
          if (extras.fps && extras.clip_frames) seconds_per_t = (extras.clip_frames - 1) / extras.fps;
          else if (clip.duration > 0) seconds_per_t = clip.duration;
        }
        slider.max = String(state.duration);
        slider.step = String(state.duration / 1000 || 0.001);
        const box = animatedBounds(gltf.scene, T);
        const centre = box.getCenter(new T.Vector3());
        const radius = Math.max(box.getSize(new T.Vector3()).length() / 2, 1e-3);
        const distance = (radius / Math.sin((camera.fov * Math.PI) / 360)) * 0.8;
        // glTF's front (+z) holds the host's reference view: start there, slightly from above
        camera.position.set(centre.x, centre.y + 0.25 * distance, centre.z + distance);
        camera.near = distance / 100;
        camera.far = distance * 10;
        camera.updateProjectionMatrix();
        controls.target.copy(centre);
        controls.update();
        slider.addEventListener("input", function () {
          state.setTime(slider.value);
        });
        button.addEventListener("click", function () {
          setPlaying(!state.playing);
        });
        show(0);
        setPlaying(canvas.dataset.autoplay === "true");
        draw();
        state.ready = true;
        document.getElementById("viewer-status").textContent = "";
        loop();
      },
      function (error) {
        fail("the .glb did not load: " + (error && error.message ? error.message : error));
      }
    );
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
