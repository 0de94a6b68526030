// What the results page's viewer (animate124/core/report/static/viewer.js) takes from three.js, bundled by
// build_three_bundle.mjs into one classic script that defines window.A124Three (pages opened from disk cannot load
// ES modules).
export {
  AnimationMixer,
  Box3,
  Clock,
  Color,
  DirectionalLight,
  HemisphereLight,
  PerspectiveCamera,
  Scene,
  Vector3,
  WebGLRenderer,
} from "three";
export { GLTFLoader } from "three/addons/loaders/GLTFLoader.js";
export { OrbitControls } from "three/addons/controls/OrbitControls.js";
